"""The tensor codec: every datatype to and from JSON data and binary data, and each check's message."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from easyserve import Handle, Tensor
from easyserve.tensors import (
    DATATYPES,
    binary_to_array,
    check_datatype,
    json_to_array,
    output_binary,
    output_json_data,
    shape_fits,
    to_output,
)
from easyserve.v2.protocol import Signature

NUMERIC = [name for name in DATATYPES if name != "BYTES"]
SAMPLES = {  # each datatype's extremes, as JSON would carry them
    "BOOL": [True, False, True, True],
    "INT8": [-128, 127, 0, -1], "INT16": [-32768, 32767, 1, 2], "INT32": [-2**31, 2**31 - 1, 3, 4],
    "INT64": [-2**63, 2**63 - 1, 5, 6], "UINT8": [0, 255, 7, 8], "UINT16": [0, 65535, 9, 10],
    "UINT32": [0, 2**32 - 1, 11, 12], "UINT64": [0, 2**64 - 1, 13, 14],
    "FP16": [1.5, -65504.0, 0.0, 2], "FP32": [0.1, -3.4e38, 1e-30, 7], "FP64": [0.1, 1.7e308, -2.5e-300, 9],
    "BYTES": ["", "héllo", "a\x00b", "ok"], "BF16": [1.5, -3.38e38, 1e-30, 7],
}


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_json_data_flat_or_nested_gives_the_datatypes_array(datatype):
    flat = SAMPLES[datatype]
    nested = [flat[:2], flat[2:]]
    for data in (flat, nested):
        array = json_to_array(data, datatype, [2, 2])
        assert array.dtype == DATATYPES[datatype] and array.shape == (2, 2)
        expected = [s.encode() for s in flat] if datatype == "BYTES" else np.array(flat, DATATYPES[datatype])
        assert list(array.reshape(-1)) == list(expected)


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_binary_data_round_trips_every_datatype(datatype):
    array = json_to_array(SAMPLES[datatype], datatype, [4])
    raw = output_binary(array, datatype)
    if datatype != "BYTES":
        assert len(raw) == 4 * DATATYPES[datatype].itemsize
    back = binary_to_array(b"head" + raw + b"tail", 4, len(raw), datatype, [2, 2])
    assert back.dtype == array.dtype and back.shape == (2, 2)
    assert list(back.reshape(-1)) == list(array)


def test_binary_data_is_little_endian_and_bytes_elements_are_length_prefixed():
    assert output_binary(np.array([1, 256], np.uint16), "UINT16") == b"\x01\x00\x00\x01"
    assert output_binary(np.array([True, False]), "BOOL") == b"\x01\x00"
    elements = np.array([b"ab", b"", b"\x00\x00"], dtype=object)
    assert output_binary(elements, "BYTES") == b"\x02\x00\x00\x00ab\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00"
    assert binary_to_array(b"\x00\x01", 0, 2, "INT16", [1])[0] == 256


def test_fixed_size_binary_data_is_read_in_place_when_aligned_and_copied_when_not():
    body = bytearray(np.arange(6, dtype=np.float32).tobytes() + b"\x00")
    aligned = binary_to_array(body, 4, 16, "FP32", [4])
    assert np.shares_memory(aligned, np.frombuffer(body, np.uint8)) and aligned.flags.writeable
    assert list(aligned) == [1, 2, 3, 4]
    unaligned = binary_to_array(b"x" + bytes(body[:16]), 1, 16, "FP32", [2, 2])
    assert unaligned.flags.aligned and unaligned.reshape(-1).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("datatype,data,message", [
    ("INT32", [1, 2.5], "INT32 data must hold integers, and holds numbers with a point or an exponent (2.0 is one: "
              "write 2)"),
    ("INT64", [1.0, 2.0], "INT64 data must hold integers, and holds numbers with a point or an exponent (2.0 is one: "
              "write 2)"),
    ("INT32", [1, True], "INT32 data must hold integers, and holds booleans"),
    ("FP32", [1.0, "2"], "FP32 data must hold numbers, and holds strings"),
    ("FP32", [1.0, None], "FP32 data must hold numbers, and holds null"),
    ("FP32", [1.0, {"a": 1}], "FP32 data must hold numbers, and holds objects"),
    ("BOOL", [1, 0], "BOOL data must hold true or false, and holds integers"),
    ("BYTES", ["a", 1], "BYTES data must hold strings, and holds integers"),
    ("INT8", [127, 128], "128 is out of range for INT8 (-128 to 127)"),
    ("UINT8", [-1, 3], "-1 is out of range for UINT8 (0 to 255)"),
    ("UINT64", [2**64, 1], "18446744073709551616 is out of range for UINT64"),
    ("INT64", [-2**63 - 1, 0], "is out of range for INT64"),
    # as they come over the wire: orjson reads them as floats, which were called "numbers with a fraction"
    ("UINT64", orjson.loads(b"[18446744073709551616, 1]"), "1.84467e+19 is out of range for UINT64"),
    ("INT64", orjson.loads(b"[0, -9223372036854775809]"), "-9.22337e+18 is out of range for INT64"),
    ("FP16", [65520.0, 1], "65520.0 is out of range for FP16"),
    ("FP32", [1e39, 1], "1e+39 is out of range for FP32"),
    ("FP64", [10**400, 1], "is out of range for FP64"),
])
def test_json_data_of_the_wrong_kind_or_range_is_refused(datatype, data, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(").replace(")", r"\)")):
        json_to_array(data, datatype, [2])


def test_the_largest_float_of_a_type_as_written_out_is_in_range():
    # this server writes FP32's largest value as 3.4028235e+38, a hair above it as a float64: sent
    # back, it was refused as out of range (its message saying "largest 3.40282e+38"); and 65519, which
    # FP16 rounds to its largest (65504), was refused too
    largest32 = float(orjson.dumps(np.finfo(np.float32).max, option=orjson.OPT_SERIALIZE_NUMPY))
    assert json_to_array([largest32, -largest32], "FP32", [2]).tolist() == [np.finfo(np.float32).max,
                                                                          np.finfo(np.float32).min]
    assert json_to_array([65519, -65519.0], "FP16", [2]).tolist() == [65504, -65504]
    with pytest.raises(ValueError, match=r"^65520 is out of range for FP16 \(largest 65504\)$"):
        json_to_array([65520, 1], "FP16", [2])
    with pytest.raises(ValueError, match=r"^3.41e\+38 is out of range for FP32 \(largest 3.4028235e\+38\)$"):
        json_to_array([3.41e38, 1], "FP32", [2])


def test_json_data_must_be_an_array_of_the_shapes_count():
    with pytest.raises(ValueError, match=r"data has 3 element\(s\) but shape \[2, 2\] holds 4"):
        json_to_array([1, 2, 3], "INT32", [2, 2])
    with pytest.raises(ValueError, match=r"data has 5 element\(s\) but shape \[2, 2\] holds 4"):
        json_to_array([1, 2, 3, 4, 5], "INT32", [2, 2])
    # one element sent bare: told to put it in an array (where it was told "2.0 is one: write 2" of 1.5)
    with pytest.raises(ValueError, match=r"data must be a JSON array of the elements, not one value: write \[5\]$"):
        json_to_array(5, "INT32", [])
    with pytest.raises(ValueError, match=r"not one value: write \[1.5\]$"):
        json_to_array(1.5, "FP32", [1])
    with pytest.raises(ValueError, match=r'not one string: write \["a"\]$'):
        json_to_array("a", "BYTES", [1])
    with pytest.raises(ValueError, match=r"not an object$"):
        json_to_array({"a": 1}, "FP32", [1])
    assert json_to_array([], "FP16", [0, 3]).shape == (0, 3)
    assert json_to_array([[], []], "FP16", [2, 0]).shape == (2, 0)


@pytest.mark.parametrize("data,shape,message", [
    ([[1, 2, 3, 4], [5, 6]], [2, 3], r"a list at depth 2 has 2 item\(s\), but dimension 1 of shape \[2, 3\] is 3"),
    ([[1, 2], [3, 4], [5, 6]], [2, 3], r"data has 3 item\(s\), but dimension 0 of shape \[2, 3\] is 2"),
    ([[1], [2], [3]], [3], r"data holds a list where shape \[3\] has an element"),
    ([[1, 2, 3], [4, 5, [6]]], [2, 3], r"a list at depth 2 holds a list where shape \[2, 3\] has an element"),
    ([[1, 2, 3], 4, 5, 6], [2, 3], r"data has 4 item\(s\)"),
    ([[1, 2, 3], 4], [2, 3], r"data holds an element where shape \[2, 3\] has a list"),
])
def test_nested_json_data_must_be_nested_as_its_shape(data, shape, message):
    """Flat data is read row-major whatever the shape; nested data that is ragged or nested otherwise
    than the shape says is refused: read row-major, it would reach the model silently reshaped."""
    assert json_to_array(list(range(6)), "INT32", [2, 3]).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert json_to_array([[0, 1, 2], [3, 4, 5]], "INT32", [2, 3]).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match=message):
        json_to_array(data, "INT32", shape)


def test_json_nested_deeper_than_recursion_allows_is_refused_without_recursing():
    deep = [7]
    for _ in range(2000):  # deeper than Python's recursion limit
        deep = [deep]
    with pytest.raises(ValueError, match=r"data holds a list where shape \[1\] has an element"):
        json_to_array(deep, "INT8", [1])
    as_deep = [7]
    for _ in range(31):
        as_deep = [as_deep]
    assert json_to_array(as_deep, "INT8", [1] * 32).shape == (1,) * 32  # nested as its shape: read


@pytest.mark.parametrize("datatype,shape,data,message", [
    ("FP32", [3], b"\x00" * 8, r"binary data is 8 bytes, but shape \[3\] of FP32 takes 12 \(3 x 4\)"),
    ("INT64", [2, 2], b"\x00" * 33, r"shape \[2, 2\] of INT64 takes 32"),
    ("BOOL", [2], b"\x01\x02", "BOOL binary data must hold only bytes 0 .false. and 1 .true."),
    ("BYTES", [1], b"\x05\x00\x00", "BYTES element 0: its 4-byte length is cut off"),
    ("BYTES", [1], b"\x05\x00\x00\x00abc", "BYTES element 0 says it has 5 bytes, but only 3 are left"),
    ("BYTES", [2], b"\x01\x00\x00\x00a\xff\xff\xff\xff", "BYTES element 1 says it has 4294967295 bytes"),
    ("BYTES", [1], b"\x01\x00\x00\x00a\x01\x00\x00\x00b", r"more than the 1 BYTES element\(s\)"),
    ("BYTES", [3], b"\x01\x00\x00\x00a", r"binary data holds 1 BYTES element\(s\), but its shape holds 3"),
    ("BYTES", [0], b"\x00", r"more than the 0 BYTES element\(s\)"),
])
def test_binary_data_that_disagrees_with_its_shape_is_refused(datatype, shape, data, message):
    with pytest.raises(ValueError, match=message):
        binary_to_array(data, 0, len(data), datatype, shape)


def test_bytes_elements_keep_every_byte_and_only_their_own():
    body = b"JSON" + output_binary(np.array([b"\x00png\x00\x00", b"z"], dtype=object), "BYTES") + b"rest"
    elements = binary_to_array(body, 4, len(body) - 8, "BYTES", [2])
    assert elements.tolist() == [b"\x00png\x00\x00", b"z"]


@pytest.mark.parametrize("value,datatype,shape", [
    (np.zeros((2, 3), np.float16), "FP16", [2, 3]),
    (np.arange(3, dtype=np.uint32), "UINT32", [3]),
    (7, "INT64", []),
    (2.5, "FP64", []),
    (True, "BOOL", []),
    ([1, 2], "INT64", [2]),
    ([[0.5], [1.5]], "FP64", [2, 1]),
    ("label", "BYTES", []),
    (["a", "b"], "BYTES", [2]),
    ([b"\x00\x00"], "BYTES", [1]),
    (np.array(["x", "yz"]), "BYTES", [2]),
])
def test_outputs_take_their_datatype_from_their_values(value, datatype, shape):
    array, got = to_output(value)
    assert (got, list(array.shape)) == (datatype, shape)
    if datatype == "BYTES":
        assert all(type(e) is bytes for e in array.flat)
    assert to_output([b"\x00\x00"])[0][0] == b"\x00\x00"  # numpy's "S" type would drop them


@pytest.mark.parametrize("value,declared,message", [
    (np.zeros(2, np.complex64), None, r"is an array of complex64, which the protocol has no datatype for; answer "
                                      r"their real and imaginary parts, z.real and z.imag \(torch: torch.view_as_real"),
    ([{"a": 1}], None, "holds a dict"),
    (["a", 1], None, "holds a int"),
    ([300], Tensor("y", "UINT8", [1]), "holds values out of range for UINT8"),
    ([1.5], Tensor("y", "INT64", [1]), "is FP64, but its metadata says INT64"),
    (["a"], Tensor("y", "FP32", [1]), "is BYTES, but its metadata says FP32"),
    ([1.0], Tensor("y", "BYTES", [1]), "is FP64, but its metadata says BYTES"),
    ([True], Tensor("y", "INT8", [1]), "is BOOL, but its metadata says INT8"),
    ([1e300], Tensor("y", "FP32", [1]), "holds values too large for FP32"),
    ([1.0, 2.0], Tensor("y", "FP64", [1]), r"has shape \[2\], but its metadata says \[1\]"),
    (np.zeros((2, 5)), Tensor("y", "FP64", [-1, 4]), r"has shape \[2, 5\], but its metadata says \[-1, 4\]"),
])
def test_outputs_that_their_metadata_does_not_describe_are_refused(value, declared, message):
    with pytest.raises((ValueError, TypeError), match=message):
        to_output(value, declared)


def test_big_endian_outputs_keep_their_datatype_and_go_out_little_endian():
    """Big-endian arrays (FITS data, a .npy from another machine) used to be 500s: "no datatype for >f4"."""
    cases = [(np.array([1.5, -2.0], ">f4"), None, "FP32"),
             (np.array([1, 300], ">i2"), Tensor("y", "INT32", [2]), "INT32")]
    for value, declared, expected in cases:
        array, datatype = to_output(value, declared)
        assert (datatype, array.dtype.isnative, array.tolist()) == (expected, True, value.tolist())
        assert output_binary(array, datatype) == value.astype(array.dtype.newbyteorder("<")).tobytes()
        assert output_json_data(array, datatype).tolist() == value.tolist()


def test_python_integers_past_int64_keep_every_digit():
    """numpy reads [3, 2**64 - 1] as float64: it was answered FP64, 1.8446744073709552e+19."""
    for declared in (None, Tensor("hashes", "UINT64", [-1])):
        array, datatype = to_output([3, 2**64 - 1], declared)
        assert (datatype, array.tolist()) == ("UINT64", [3, 2**64 - 1])
    with pytest.raises(ValueError, match="holds the integers -1 and 9223372036854775808, which no one datatype"):
        to_output([-1, 2**63])
    # among floats, an integer past 2**53 was answered FP64, rounded, where /predict's JSON answers it exactly
    with pytest.raises(ValueError, match="holds the integer 9007199254740993 among floats, which FP64 cannot hold"):
        to_output([2**53 + 1, 0.5])
    with pytest.raises(ValueError, match="holds the integer 9007199254740993 among floats"):
        to_output([np.int64(2**53 + 1), 0.5])
    assert to_output([2**60, 0.5])[0].tolist() == [2.0**60, 0.5]  # one FP64 holds exactly: taken


def test_declared_outputs_are_cast_when_no_value_changes():
    array, datatype = to_output(np.array([0.1, 2.0]), Tensor("y", "FP32", [-1]))
    assert (array.dtype, datatype) == (np.float32, "FP32")
    assert to_output([255], Tensor("y", "UINT8", [1]))[0].dtype == np.uint8
    assert to_output([3], Tensor("y", "FP16", [1]))[0].dtype == np.float16
    empty, datatype = to_output([], Tensor("labels", "BYTES", [-1]))  # no detections: float64 to numpy
    assert (empty.shape, datatype) == ((0,), "BYTES")


def test_json_output_data_is_flat_and_refuses_what_json_cannot_carry():
    assert output_json_data(np.array([[1, 2], [3, 4]], np.int8), "INT8").tolist() == [1, 2, 3, 4]
    assert output_json_data(np.array([b"caf\xc3\xa9"], dtype=object), "BYTES") == ["café"]
    with pytest.raises(ValueError, match="holds NaN or infinity, which JSON cannot carry"):
        output_json_data(np.array([1.0, np.inf], np.float32), "FP32")
    with pytest.raises(ValueError, match="holds bytes that are not UTF-8 text"):
        output_json_data(np.array([b"\xff"], dtype=object), "BYTES")


def test_datatypes_shapes_and_tensor_declarations_are_checked():
    assert check_datatype("FP16") == "FP16"
    with pytest.raises(ValueError, match="unknown datatype 'FLOAT32'; expected one of BOOL, INT8"):
        check_datatype("FLOAT32")
    assert check_datatype("BF16") == "BF16"  # ml_dtypes' bfloat16 (it was refused: numpy has none)
    assert shape_fits((5, 3), (-1, 3)) and not shape_fits((5, 3), (-1,)) and not shape_fits((5, 4), (-1, 3))
    assert Tensor("x", "FP32", [-1, 3]).metadata() == {"name": "x", "datatype": "FP32", "shape": [-1, 3]}
    assert Tensor("x", "FP32", [5]).metadata(batched=True) == {"name": "x", "datatype": "FP32", "shape": [-1, 5]}
    with pytest.raises(ValueError, match="unknown datatype 'float'"):
        Tensor("x", "float", [1])
    with pytest.raises(ValueError, match=r"shape must be a list of sizes \(-1 for any\), got \[-2\]"):
        Tensor("x", "FP32", [-2])
    with pytest.raises(ValueError, match="shape must be a list of sizes"):
        Tensor("x", "FP32", "3")
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        Tensor("", "FP32", [1])
    with pytest.raises(ValueError, match="'x': shape has 33 dimensions; at most 32"):
        Tensor("x", "FP32", [1] * 33)
    assert Tensor("x", "FP32", [1] * 32).shape == (1,) * 32


def test_a_handles_signature_is_its_declared_tensors():
    class Declared(Handle):
        inputs = [Tensor("x", "FP32", [-1])]
        outputs = (Tensor("y", "INT64", [1]),)

    assert Signature.of(Declared) == Signature((Tensor("x", "FP32", [-1]),), (Tensor("y", "INT64", [1]),))
    assert Signature.of(Handle) == Signature()

    class Names(Handle):
        inputs = ["x"]

    class Twice(Handle):
        outputs = [Tensor("y", "FP32", [1]), Tensor("y", "FP64", [1])]

    with pytest.raises(TypeError, match="Names.inputs must be a list of easyserve.Tensor, and holds 'x'"):
        Signature.of(Names)
    with pytest.raises(TypeError, match="Twice.outputs names y more than once"):
        Signature.of(Twice)

    # after setup, an instance's own tensors (OnnxModel reads them from its model); an instance that
    # keeps something else under the name (its output names) has its class's: it failed to start
    made, kept = Declared(), Declared()
    made.outputs = [Tensor("z", "FP32", [3])]
    kept.outputs = ["probabilities"]
    assert Signature.of(made) == Signature((Tensor("x", "FP32", [-1]),), (Tensor("z", "FP32", [3]),))
    assert Signature.of(kept) == Signature.of(Declared)


def test_bf16_is_ml_dtypes_bfloat16_in_json_binary_and_outputs_cast_to_it():
    import ml_dtypes

    bf16 = np.dtype(ml_dtypes.bfloat16)
    array = json_to_array([[1.5, -2], [0.1, 3]], "BF16", [2, 2])
    assert array.dtype == bf16 and array.astype(np.float32).tolist() == [[1.5, -2.0], [0.10009765625, 3.0]]
    raw = output_binary(array, "BF16")
    assert len(raw) == 8 and binary_to_array(b"x" + raw, 1, 8, "BF16", [2, 2]).tolist() == array.tolist()
    assert output_json_data(array, "BF16").tolist()[2] == 0.10009765625  # exactly (float32's is 0.100097656)
    with pytest.raises(ValueError, match=r"1e\+39 is out of range for BF16 \(largest 3.3895314e\+38\)"):
        json_to_array([1e39], "BF16", [1])
    # a handle's float32 answers, cast to the BF16 its metadata declares; one past its range refused
    cast, datatype = to_output(np.array([0.5, 2.0], np.float32), Tensor("y", "BF16", [2]))
    assert (cast.dtype, datatype) == (bf16, "BF16")
    with pytest.raises(ValueError, match="holds values too large for BF16"):
        to_output(np.array([1e39], np.float64), Tensor("y", "BF16", [1]))
    back, datatype = to_output(array, Tensor("y", "FP32", [2, 2]))  # and BF16 answers to a declared FP32
    assert (back.dtype, datatype) == (np.float32, "FP32")
    with pytest.raises(ValueError, match="holds NaN or infinity"):
        output_json_data(np.array([np.nan], bf16), "BF16")
