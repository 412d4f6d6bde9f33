"""The Open Inference Protocol's wire format: JSON tensors and the binary tensor data extension.

Knows nothing of tasks or models: it turns a request body into named, typed, shaped tensors and
named outputs back into a body. Every malformed request becomes a `BadRequest` naming what is wrong.

Binary extension: the header `Inference-Header-Content-Length: n` says the first n bytes of the body
are the JSON request; each input with `parameters.binary_data_size` takes its bytes, in input order,
from the rest. BYTES tensors in binary form are elements each prefixed by a 4-byte little-endian length.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.errors import BadRequest, PayloadTooLarge

HEADER_LENGTH = "Inference-Header-Content-Length"
ASCII_DIGITS = re.compile(r"[0-9]+")  # str.isdigit() also takes "²" and other non-ASCII digits
_END = object()
NUMPY_DTYPES = {"FP32": np.dtype("<f4")}  # the only numeric datatype our models take or give


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None  # JSON form: possibly nested, as sent
    raw: bytes | None = None  # binary form

    def as_bytes_elements(self) -> list[bytes]:
        """A BYTES tensor's elements: raw in the binary form, as UTF-8 text in the JSON form."""
        if self.raw is not None:
            return deserialize_bytes(self.raw, self.name)
        elements = _flatten(self.data)
        if not all(isinstance(element, str) for element in elements):
            raise BadRequest(f"input {self.name!r}: BYTES data in JSON must be strings")
        return [element.encode() for element in elements]

    def as_numpy(self) -> np.ndarray:
        """A numeric tensor with exactly the declared shape."""
        dtype = NUMPY_DTYPES[self.datatype]
        count = math.prod(self.shape)
        if self.raw is not None:
            if len(self.raw) != count * dtype.itemsize:
                raise BadRequest(
                    f"input {self.name!r}: {len(self.raw)} bytes of binary data for shape {self.shape} of "
                    f"{self.datatype}; expected {count * dtype.itemsize}"
                )
            return np.frombuffer(self.raw, dtype=dtype).reshape(self.shape)
        elements = _flatten(self.data)
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in elements):
            raise BadRequest(f"input {self.name!r}: {self.datatype} data must be numbers")
        if len(elements) != count:
            raise BadRequest(f"input {self.name!r}: {len(elements)} values for shape {self.shape}; expected {count}")
        try:
            return np.asarray(elements, dtype=dtype).reshape(self.shape)
        except OverflowError as exc:
            raise BadRequest(f"input {self.name!r}: a value does not fit {self.datatype} ({exc})") from exc


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int | None = None


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: every output, in `default_binary` form
    default_binary: bool = False
    classification: int | None = None  # request-level classification extension: every output's top k


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[bytes]  # numeric array, or BYTES elements in row-major order
    binary: bool
    _encoded: bytes | None = field(default=None, repr=False)

    def encoded(self) -> bytes:
        if self._encoded is None:
            if self.datatype == "BYTES":
                self._encoded = serialize_bytes(self.values)
            else:
                self._encoded = np.ascontiguousarray(self.values, dtype=NUMPY_DTYPES[self.datatype]).tobytes()
        return self._encoded

    def to_json(self) -> dict:
        tensor = {"name": self.name, "datatype": self.datatype, "shape": self.shape}
        if self.binary:
            tensor["parameters"] = {"binary_data_size": len(self.encoded())}
        elif self.datatype == "BYTES":
            tensor["data"] = [element.decode() for element in self.values]
        else:
            tensor["data"] = np.asarray(self.values).reshape(-1).tolist()
        return tensor


def _flatten(data: Any) -> list[Any]:
    """Row-major elements of a (possibly nested) JSON array; iterative, so no nesting depth can overflow."""
    flat, stack = [], [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"input {name!r}: BYTES data ends inside an element's 4-byte length prefix")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(f"input {name!r}: BYTES element of {length} bytes runs past the end of its data")
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


def serialize_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(element)) + element for element in elements)


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _parameters(value: dict, what: str) -> dict:
    return _object(value.get("parameters") or {}, f"{what}.parameters")


def _shape(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
        raise BadRequest(f"{what}.shape must be a list of non-negative integers")
    return value


def parse_infer_request(body: bytes, header_length: str | None, max_values: int) -> InferRequest:
    """Split the body (JSON, or JSON + binary tensors), validate its structure, and attach each input's data.

    `max_values` bounds the JSON values the request may hold (all inputs' elements, with room for the
    rest): it is checked on the raw text before parsing, since parsed JSON takes ten times or more the
    memory of its text.
    """
    binary = b""
    if header_length is not None:
        if not ASCII_DIGITS.fullmatch(header_length.strip()) or int(header_length) > len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be an integer no larger than the body ({len(body)} bytes)")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    _check_value_count(body, max_values)
    try:
        request = _object(json.loads(body), "the inference request")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"the inference request is not valid JSON ({exc})") from exc
    parameters = _parameters(request, "request")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    inputs, offset = [], 0
    for index, raw in enumerate(raw_inputs):
        what = f"inputs[{index}]"
        raw = _object(raw, what)
        name, datatype = raw.get("name"), raw.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise BadRequest(f"{what} needs a string 'name' and 'datatype'")
        tensor = InputTensor(name=name, datatype=datatype, shape=_shape(raw.get("shape"), what))
        size = _parameters(raw, what).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise BadRequest(f"{what}.parameters.binary_data_size={size!r} does not fit the binary data sent")
            tensor.raw = binary[offset : offset + size]
            offset += size
        elif "data" in raw:
            tensor.data = raw["data"]
        else:
            raise BadRequest(f"{what} ({name!r}) has neither 'data' nor parameters.binary_data_size")
        inputs.append(tensor)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data after the last binary input")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadRequest("parameters.binary_data_output must be true or false")
    outputs = None
    if request.get("outputs") is not None:
        if not isinstance(request["outputs"], list):
            raise BadRequest("'outputs' must be a list")
        outputs = [_requested_output(raw, f"outputs[{i}]", default_binary) for i, raw in enumerate(request["outputs"])]
        _check_distinct(outputs)
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    classification = _top_k(parameters.get("classification"), "parameters.classification")
    return InferRequest(request_id, inputs, outputs, default_binary, classification)


def _check_value_count(json_text: bytes, max_values: int) -> None:
    """Every JSON value after the first is preceded by a comma: counting them (outside strings too, an
    over-count) is a cheap upper bound on what parsing would build, taken before any of it is built."""
    commas = json_text.count(b",")
    if commas >= max_values:
        raise PayloadTooLarge(
            f"the inference request holds more than {max_values} JSON values; no input of this model needs "
            "that many (send fewer images, or tensors in the binary form)"
        )


def _check_distinct(outputs: list[RequestedOutput]) -> None:
    seen = set()
    for output in outputs:
        if output.name in seen:
            raise BadRequest(f"output {output.name!r} requested more than once; name each output at most once")
        seen.add(output.name)


def _requested_output(raw: Any, what: str, default_binary: bool) -> RequestedOutput:
    raw = _object(raw, what)
    parameters = _parameters(raw, what)
    if not isinstance(raw.get("name"), str):
        raise BadRequest(f"{what} needs a string 'name'")
    binary = parameters.get("binary_data", default_binary)
    if not isinstance(binary, bool):
        raise BadRequest(f"{what}.parameters.binary_data must be true or false")
    classification = _top_k(parameters.get("classification"), f"{what}.parameters.classification")
    return RequestedOutput(name=raw["name"], binary=binary, classification=classification)


def _top_k(value: Any, what: str) -> int | None:
    """The classification extension's k: a positive integer, or absent."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise BadRequest(f"{what} must be a positive integer (the k of top-k)")
    return value


def encode_infer_response(response: dict, outputs: list[OutputTensor]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers: plain JSON, or JSON then binary outputs in order."""
    header = json.dumps({**response, "outputs": [output.to_json() for output in outputs]}).encode()
    binary = [output.encoded() for output in outputs if output.binary]
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(binary), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}
