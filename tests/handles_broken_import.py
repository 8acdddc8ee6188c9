"""A handle module that is there but cannot be imported: it imports what is not installed."""

import easyserve_no_such_dependency  # noqa: F401

from easyserve import Handle


class Lacks(Handle):
    def forward(self, batch):
        return batch
