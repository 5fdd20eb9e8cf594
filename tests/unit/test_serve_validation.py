"""What the model server accepts before a request joins a batch, and which file serves which kind."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

import workloads.serve as serve
from workloads.errors import ConfigError
from workloads.serve_model import accuracy_of, choose_file


@pytest.fixture
def shape(monkeypatch):
    monkeypatch.setattr(serve, "EXPECTED_SHAPE", (1, 2, 2))


def image(v=0.5):
    return [[[v, v], [v, v]]]


def test_a_batch_in_the_models_shape_becomes_one_float32_array(shape):
    req = serve.PredictRequest(inputs=[image(), image(1)])
    assert req.inputs.shape == (2, 1, 2, 2) and str(req.inputs.dtype) == "float32"


@pytest.mark.parametrize("inputs, message", [
    ([], "inputs is empty"),
    ([[[0.0, 0.0]]], "each input must have shape [1, 2, 2]; got a batch of shape [1, 1, 2]"),
    ([image(), [[[0.0], [0.0, 1.0]]]], "ragged, or not numbers"),
    ([[[["a", "b"], ["c", "d"]]]], "ragged, or not numbers"),
    ([image(math.nan)], "NaN or infinity"),
    ([image()] * (serve.MAX_INPUTS + 1), f"at most {serve.MAX_INPUTS} per request"),
])
def test_a_bad_batch_is_refused_with_what_is_wrong(shape, inputs, message):
    with pytest.raises(ValidationError) as info:
        serve.PredictRequest(inputs=inputs)
    assert message in str(info.value)


def test_unknown_fields_and_a_missing_inputs_are_refused(shape):
    with pytest.raises(ValidationError, match="Field required"):
        serve.PredictRequest.model_validate({"input": [image()]})
    with pytest.raises(ValidationError, match="Extra inputs"):
        serve.PredictRequest.model_validate({"inputs": [image()], "extra": 1})


@pytest.mark.parametrize("kind, framework, present, expected", [
    ("auto", "torch", {"model.pt2", "model_int8.ts"}, ("fp32", "model.pt2")),
    ("fp32", "torch", {"model.ts"}, ("fp32", "model.ts")),
    ("int8", "torch", {"model.pt2", "model_int8.ts"}, ("int8", "model_int8.ts")),
    ("auto", "tensorflow", {"model.keras"}, ("fp32", "model.keras")),
])
def test_each_kind_serves_the_runs_file_for_it(kind, framework, present, expected):
    assert choose_file(kind, framework, present, "file:///r") == expected


@pytest.mark.parametrize("kind, framework, present, message", [
    ("int8", "torch", {"model.pt2"}, "has no int8 model (model_int8.ts); it has: fp32"),
    ("fp32", "torch", {"model.pth"}, "exported no model"),
    ("int8", "tensorflow", {"model.keras"}, "serves as fp32 only"),
    ("fp16", "torch", {"model.pt2"}, "not one of auto, fp32, int8"),
])
def test_a_kind_the_run_lacks_is_one_clear_error(kind, framework, present, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose_file(kind, framework, present, "file:///r")


def test_the_int8_model_reports_its_own_accuracy():
    summary = {"test_accuracy": 0.98, "quantization": {"test_accuracy_int8": 0.97}}
    assert accuracy_of(summary, "int8") == 0.97 and accuracy_of(summary, "fp32") == 0.98
