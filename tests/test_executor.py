"""The engine: validation errors, execution order, lazy inputs, lists, the cache, interrupts and failures."""

import collections
import math

import pytest
from PIL import Image

from nodes.common.progress import progress
from web.executor import Executor

RUNS = collections.Counter()  # class name -> executions, reset per test


@pytest.fixture(autouse=True)
def reset_runs():
    RUNS.clear()


def number(default=0):
    return ("INT", {"default": default, "min": 0, "max": 100, "step": 1})


class Number:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": number()}}

    def run(self, value):
        RUNS["Number"] += 1
        return (value,)


class Add:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}), "b": number(1)}}

    def run(self, a, b):
        RUNS["Add"] += 1
        return (a + b,)


class Show:
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT,FLOAT", {"forceInput": True})}}

    def run(self, value):
        RUNS["Show"] += 1
        return {"ui": {"text": [str(value)]}}


class Pick:
    """Chooses one of two lazy inputs, so only the chosen branch runs."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"first": ("BOOLEAN", {"default": True}),
                             "a": ("INT", {"lazy": True, "forceInput": True}),
                             "b": ("INT", {"lazy": True, "forceInput": True})}}

    def check_lazy_status(self, first, a=None, b=None):
        return ["a"] if first else ["b"]

    def run(self, first, a=None, b=None):
        RUNS["Pick"] += 1
        return (a if first else b,)


class Choose:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"legacy": (["x", "y"],), "modern": ("COMBO", {"options": ["p", "q"]})}}

    def run(self, legacy, modern):
        return (0,)


class Even:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": number()}}

    @classmethod
    def VALIDATE_INPUTS(cls, value):
        return True if value % 2 == 0 else f"value must be even; got {value}"

    def run(self, value):
        return (value,)


class BrokenValidation(Even):
    @classmethod
    def VALIDATE_INPUTS(cls, value):
        raise RuntimeError("validator crashed")


class Text:
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}}

    def run(self, text):
        return (text,)


class Fail:
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    def run(self, value):
        raise ValueError(f"cannot handle {value}")


class Steps:
    """Reports progress with a preview each step, as a sampler does."""

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": number(5)}}

    def run(self, steps):
        for step in range(1, steps + 1):
            RUNS["step"] += 1
            progress(step, steps, Image.new("RGB", (8, 8)))
        return (steps,)


class Split:
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": number(3)}}

    def run(self, count):
        return (list(range(count)),)


class Total:
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT", {"forceInput": True})}}

    def run(self, values):
        return (sum(values),)


class Changed:
    """IS_CHANGED returns whatever the test sets, as a file-reading node would return a hash."""

    token = "a"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": number()}}

    @classmethod
    def IS_CHANGED(cls, value):
        return cls.token

    def run(self, value):
        RUNS["Changed"] += 1
        return (value,)


CLASSES = {cls.__name__: cls for cls in (Number, Add, Show, Pick, Choose, Even, BrokenValidation, Text, Fail, Steps,
                                          Split, Total, Changed)}


def run(executor, prompt, events=None):
    checked = executor.validate(prompt)
    assert checked.ok, (checked.error, checked.node_errors)
    listener = (lambda event, data: events.append((event, data))) if events is not None else None
    return executor.execute(checked.prompt, "id", checked.outputs, listener)


def chain(value=1, b=2):
    return {"1": {"class_type": "Number", "inputs": {"value": value}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": b}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


# --- validation -------------------------------------------------------------------------------------------------

def errors_of(prompt, node_id):
    result = Executor(CLASSES).validate(prompt)
    assert not result.ok
    entry = result.node_errors[node_id]
    assert set(entry) == {"errors", "dependent_outputs", "class_type"}
    for error in entry["errors"]:
        assert set(error) == {"type", "message", "details", "extra_info"}
    return [e["type"] for e in entry["errors"]], entry


@pytest.mark.parametrize("prompt, message", [
    ({"1": {"inputs": {}}}, "missing the class_type"),
    ([], "non-empty object"),
])
def test_invalid_prompt(prompt, message):
    result = Executor(CLASSES).validate(prompt)
    assert not result.ok and result.error["type"] == "invalid_prompt" and message in result.error["message"]
    assert result.node_errors == {}


def test_every_node_of_an_unknown_type_is_a_node_error_naming_its_type():
    prompt = chain()
    prompt["2"]["class_type"] = "Nope"
    prompt["4"] = {"class_type": "AlsoMissing", "inputs": {}, "_meta": {"title": "Lonely"}}
    result = Executor(CLASSES).validate(prompt)
    assert not result.ok and result.outputs == []
    assert result.error["type"] == "missing_node_type" and result.error["message"].endswith(": AlsoMissing, Nope")
    assert result.node_errors == {
        "2": {"class_type": "Nope", "dependent_outputs": ["3"], "errors": [{
            "type": "missing_node_type", "message": "Node type 'Nope' is not installed", "details": "Node ID '#2'",
            "extra_info": {"node_id": "2", "class_type": "Nope", "node_title": "Nope"}}]},
        "4": {"class_type": "AlsoMissing", "dependent_outputs": [], "errors": [{
            "type": "missing_node_type", "message": "Node type 'AlsoMissing' is not installed",
            "details": "Node ID '#4'", "extra_info": {"node_id": "4", "class_type": "AlsoMissing",
                                                      "node_title": "Lonely"}}]},
    }


def test_prompt_without_outputs():
    result = Executor(CLASSES).validate({"1": {"class_type": "Number", "inputs": {"value": 1}}})
    assert result.error["type"] == "prompt_no_outputs"


def test_required_input_missing():
    prompt = chain()
    del prompt["2"]["inputs"]["b"]
    types, entry = errors_of(prompt, "2")
    assert types == ["required_input_missing"] and entry["dependent_outputs"] == ["3"]
    assert entry["errors"][0]["extra_info"]["input_name"] == "b"


@pytest.mark.parametrize("link", [["1"], ["1", 0, 1], [1, 0], ["9", 0], ["1", 3]])
def test_bad_linked_input(link):
    prompt = chain()
    prompt["2"]["inputs"]["a"] = link
    assert errors_of(prompt, "2")[0] == ["bad_linked_input"]


def test_return_type_mismatch():
    prompt = chain()
    prompt["4"] = {"class_type": "Text", "inputs": {"text": "x"}}
    prompt["2"]["inputs"]["a"] = ["4", 0]
    types, entry = errors_of(prompt, "2")
    assert types == ["return_type_mismatch"]
    assert entry["errors"][0]["extra_info"]["received_type"] == "STRING"


def test_union_type_accepts_either_member():
    prompt = chain()
    assert Executor(CLASSES).validate(prompt).ok  # INT feeds "INT,FLOAT"


@pytest.mark.parametrize("value, kind", [("x", "invalid_input_type"), (2.5, "invalid_input_type"),
                                         (True, "invalid_input_type"), (-1, "value_smaller_than_min"),
                                         (101, "value_bigger_than_max")])
def test_constant_errors(value, kind):
    assert errors_of(chain(b=value), "2")[0] == [kind]


def test_constants_are_cast():
    result = Executor(CLASSES).validate(chain(value="7", b=3.0))
    assert result.prompt["1"]["inputs"]["value"] == 7 and result.prompt["2"]["inputs"]["b"] == 3
    assert isinstance(result.prompt["2"]["inputs"]["b"], int)


@pytest.mark.parametrize("inputs", [{"legacy": "z", "modern": "p"}, {"legacy": "x", "modern": "z"}])
def test_value_not_in_list_for_both_combo_forms(inputs):
    prompt = {"1": {"class_type": "Choose", "inputs": inputs},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    types, entry = errors_of(prompt, "1")
    assert types == ["value_not_in_list"] and "'z' not in" in entry["errors"][0]["details"]


def test_custom_validation_failed():
    prompt = {"1": {"class_type": "Even", "inputs": {"value": 3}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    types, entry = errors_of(prompt, "1")
    assert types == ["custom_validation_failed"] and entry["errors"][0]["details"] == "value must be even; got 3"


def test_validate_inputs_replaces_built_in_range_check():
    prompt = {"1": {"class_type": "Even", "inputs": {"value": 102}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert Executor(CLASSES).validate(prompt).ok  # above max, but VALIDATE_INPUTS declares `value`


def test_validate_inputs_with_kwargs_replaces_every_built_in_check():
    class TakesAll(Even):
        @classmethod
        def VALIDATE_INPUTS(cls, **inputs):  # ComfyUI: **kwargs switches off min/max/list checks for all inputs
            return True

    prompt = {"1": {"class_type": "TakesAll", "inputs": {"value": 103}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert Executor({**CLASSES, "TakesAll": TakesAll}).validate(prompt).ok


def test_exception_during_validation():
    prompt = {"1": {"class_type": "BrokenValidation", "inputs": {"value": 2}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    types, entry = errors_of(prompt, "1")
    assert types == ["exception_during_validation"] and "validator crashed" in entry["errors"][0]["message"]


def test_cycle():
    prompt = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": 1}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = Executor(CLASSES).validate(prompt)
    assert result.error["type"] == "prompt_outputs_failed_validation"
    assert set(result.node_errors) == {"1", "2"}
    assert all(e["errors"][0]["type"] == "dependency_cycle" for e in result.node_errors.values())


def test_one_invalid_output_leaves_the_valid_one_running():
    prompt = {**chain(), "4": {"class_type": "Number", "inputs": {"value": 500}},
              "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    executor = Executor(CLASSES)
    result = executor.validate(prompt)
    assert result.ok and result.outputs == ["3"] and list(result.node_errors) == ["4"]
    assert result.node_errors["4"]["dependent_outputs"] == ["5"]
    assert executor.execute(result.prompt, "id", result.outputs).outputs == {"3": {"text": ["3"]}}


def test_partial_execution_targets():
    prompt = {**chain(), "4": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert Executor(CLASSES).validate(prompt, partial_targets=["4"]).outputs == ["4"]


# --- execution ----------------------------------------------------------------------------------------------------

def test_events_and_result_of_a_run():
    events = []
    result = run(Executor(CLASSES), chain(), events)
    assert result.status == "success" and result.outputs == {"3": {"text": ["3"]}}
    assert result.executed == ["1", "2", "3"]  # sources first
    assert [e for e, _ in events] == ["execution_start", "execution_cached", "executing", "executing", "executing",
                                      "executed", "execution_success"]
    assert events[-2][1] == {"node": "3", "display_node": "3", "output": {"text": ["3"]}, "prompt_id": "id"}
    assert [e for e, _ in result.messages] == ["execution_start", "execution_cached", "execution_success"]


def test_only_what_outputs_need_runs():
    prompt = {**chain(), "9": {"class_type": "Number", "inputs": {"value": 5}}}
    assert run(Executor(CLASSES), prompt).executed == ["1", "2", "3"]


def test_lazy_input_runs_only_the_branch_asked_for():
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 10}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 5}},
              "3": {"class_type": "Pick", "inputs": {"first": False, "a": ["1", 0], "b": ["2", 0]}},
              "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
              "5": {"class_type": "Number", "inputs": {"value": 20}},
              "6": {"class_type": "Pick", "inputs": {"first": True, "a": ["5", 0], "b": ["7", 0]}},
              "7": {"class_type": "Add", "inputs": {"a": ["5", 0], "b": 1}},
              "8": {"class_type": "Show", "inputs": {"value": ["6", 0]}}}
    result = run(Executor(CLASSES), prompt)
    assert result.outputs == {"4": {"text": ["15"]}, "8": {"text": ["20"]}}
    assert "7" not in result.executed and RUNS["Add"] == 1  # node 7 sits on the branch nobody asked for


def test_output_is_list_maps_downstream_calls_and_input_is_list_gathers_them():
    prompt = {"1": {"class_type": "Split", "inputs": {"count": 4}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
              "4": {"class_type": "Total", "inputs": {"values": ["2", 0]}},
              "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    result = run(Executor(CLASSES), prompt)
    assert RUNS["Add"] == 4
    assert result.outputs["3"] == {"text": ["10", "11", "12", "13"]}  # one call per element, ui concatenated
    assert result.outputs["5"] == {"text": ["46"]}


def test_second_prompt_runs_only_the_changed_node_and_its_descendants():
    executor = Executor(CLASSES)
    run(executor, chain(b=2))
    RUNS.clear()
    events = []
    result = run(executor, chain(b=2), events)
    assert result.executed == [] and sum(RUNS.values()) == 0
    assert dict(events)["execution_cached"]["nodes"] == ["1", "2", "3"]
    assert result.outputs == {"3": {"text": ["3"]}}  # a cached output node still reports its UI
    result = run(executor, chain(b=5))
    assert result.executed == ["2", "3"] and RUNS == {"Add": 1, "Show": 1}


def test_cache_keys_ignore_node_ids():
    executor = Executor(CLASSES)
    run(executor, chain())
    renamed = {"a": {"class_type": "Number", "inputs": {"value": 1}},
               "b": {"class_type": "Add", "inputs": {"a": ["a", 0], "b": 2}},
               "c": {"class_type": "Show", "inputs": {"value": ["b", 0]}}}
    assert run(executor, renamed).executed == []


def test_is_changed():
    prompt = {"1": {"class_type": "Changed", "inputs": {"value": 4}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    executor = Executor(CLASSES)
    Changed.token = "a"
    assert run(executor, prompt).executed == ["1", "2", "3"]
    assert run(executor, prompt).executed == []  # same value: unchanged
    Changed.token = "b"
    assert run(executor, prompt).executed == ["1", "2", "3"]
    Changed.token = math.nan  # NaN: always re-run, and everything downstream with it
    assert run(executor, prompt).executed == ["1", "2", "3"]
    assert run(executor, prompt).executed == ["1", "2", "3"]


def test_cache_budget_evicts_results():
    executor = Executor(CLASSES, cache_budget_bytes=0)
    run(executor, chain())
    assert run(executor, chain()).executed == ["1", "2", "3"]


def test_progress_and_previews_reach_the_listener():
    events = []
    prompt = {"1": {"class_type": "Steps", "inputs": {"steps": 3}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    run(Executor(CLASSES), prompt, events)
    progress_events = [d for e, d in events if e == "progress"]
    assert progress_events == [{"value": i, "max": 3, "node": "1", "prompt_id": "id"} for i in (1, 2, 3)]
    previews = [d for e, d in events if e == "preview"]
    assert len(previews) == 3 and previews[0]["node"] == "1" and previews[0]["image"].size == (8, 8)


def test_interrupt_stops_within_one_step_and_the_next_prompt_runs():
    executor = Executor(CLASSES)
    events = []

    def listener(event, data):
        events.append((event, data))
        if event == "progress" and data["value"] == 2:
            executor.interrupt()  # as POST /interrupt would, from another thread

    prompt = {"1": {"class_type": "Steps", "inputs": {"steps": 50}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    checked = executor.validate(prompt)
    result = executor.execute(checked.prompt, "id", checked.outputs, listener)
    assert result.status == "interrupted" and RUNS["step"] == 3
    interrupted = dict(events)["execution_interrupted"]
    assert interrupted["node_id"] == "1" and interrupted["node_type"] == "Steps"
    assert run(executor, chain()).status == "success"


def test_failing_node_fails_its_prompt_alone():
    executor = Executor(CLASSES)
    events = []
    prompt = {"1": {"class_type": "Number", "inputs": {"value": 4}},
              "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = run(executor, prompt, events)
    assert result.status == "error"
    error = dict(events)["execution_error"]
    assert error["node_id"] == "2" and error["node_type"] == "Fail" and error["exception_type"] == "ValueError"
    assert error["exception_message"] == "cannot handle 4" and error["executed"] == ["1"]
    assert error["current_inputs"] == {"value": ["4"]} and error["traceback"]
    assert run(executor, chain()).outputs == {"3": {"text": ["3"]}}


def test_wrong_return_shape_is_a_clear_node_error():
    class Sloppy(Number):
        def run(self, value):
            return value

    events = []
    prompt = {"1": {"class_type": "Sloppy", "inputs": {"value": 1}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    result = run(Executor({**CLASSES, "Sloppy": Sloppy}), prompt, events)
    assert result.status == "error"
    assert "must return a tuple of 1 outputs (INT)" in dict(events)["execution_error"]["exception_message"]


# --- a node class written exactly as a ComfyUI pack writes it -------------------------------------------------------

class AnyType(str):
    def __ne__(self, other):
        return False


class ImageBrightnessExample:
    def __init__(self):
        pass

    @classmethod
    def INPUT_TYPES(s):
        return {
            "required": {
                "image": ("IMAGE",),
                "factor": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "display": "number"}),
                "mode": (["multiply", "add"],),
            },
            "optional": {"anything": (AnyType("*"), {})},
            "hidden": {"unique_id": "UNIQUE_ID", "prompt": "PROMPT"},
        }

    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "report")
    FUNCTION = "apply"
    CATEGORY = "Example"

    @classmethod
    def IS_CHANGED(s, image, factor, mode, **kwargs):
        return ""

    def apply(self, image, factor, mode, anything=None, unique_id=None, prompt=None):
        out = image * factor if mode == "multiply" else (image + factor).clamp(0, 1)
        return {"ui": {"text": [f"{unique_id}:{len(prompt)}:{anything}"]}, "result": (out, mode)}


class MakeImage:
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def run(self):
        import torch
        return (torch.full((1, 4, 4, 3), 0.25),)


class ImageSink:
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def run(self, images):
        return {"ui": {"mean": [float(images.mean())]}}


def test_third_party_node_runs_unchanged():
    classes = {"ImageBrightnessExample": ImageBrightnessExample, "MakeImage": MakeImage, "ImageSink": ImageSink,
               "Number": Number}
    prompt = {"1": {"class_type": "MakeImage", "inputs": {}},
              "2": {"class_type": "ImageBrightnessExample",
                    "inputs": {"image": ["1", 0], "factor": 2, "mode": "multiply", "anything": ["3", 0]}},
              "3": {"class_type": "Number", "inputs": {"value": 7}},
              "4": {"class_type": "ImageSink", "inputs": {"images": ["2", 0]}}}
    executor = Executor(classes)
    result = run(executor, prompt)
    assert result.status == "success" and result.outputs["4"] == {"mean": [0.5]}
    assert result.outputs["2"] == {"text": ["2:4:7"]}
    assert run(executor, prompt).executed == []
