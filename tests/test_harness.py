"""lm-evaluation-harness on gptlab models: its requests answered as gptlab scores and decodes,
`scripts/evaluate.py tasks=...` end to end on a local task, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT, run_script
from gptlab.errors import ConfigError
from gptlab.inference.evaluation import continuation_logprob, multiple_choice_accuracy
from gptlab.inference.generation import continue_prompt
from gptlab.inference.harness import check_harness_config, load_tasks
from gptlab.inference.loading import load_checkpoint
from gptlab.model.tokenizers import CharTokenizer
from gptlab.training.module import GPTLightningModule

lm_eval = pytest.importorskip(
    "lm_eval", reason='lm-eval is not installed: pip install -e ".[eval]"'
)
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from gptlab.inference.harness_model import GPTLabLM  # noqa: E402

TASKS_DIR = REPO_ROOT / "tests" / "lm_eval_tasks"
ITEMS = [json.loads(line) for line in (TASKS_DIR / "gptlab_mc.jsonl").read_text().splitlines()]
TEXT = "Every effort moves you. The for statement iterates over a sequence, in order. "
# Short enough that most of the task's contexts are cut from the left and its longer choices
# need two windows: the paths a context of 1024 tokens rarely takes.
CONTEXT_LENGTH = 16


@pytest.fixture(scope="module")
def module() -> GPTLightningModule:
    """A small untrained char model: the harness and gptlab must agree for any weights."""
    chars = TEXT + "".join(item["context"] + " " + "".join(item["choices"]) for item in ITEMS)
    torch.manual_seed(0)
    config = {"context_length": CONTEXT_LENGTH, "emb_dim": 16, "n_heads": 2, "n_layers": 2}
    tokenizer = CharTokenizer.from_text(chars)
    return GPTLightningModule(
        {**config, "vocab_size": tokenizer.vocab_size}, {}, tokenizer.to_dict()
    ).eval()


@pytest.fixture(scope="module")
def ckpt(module: GPTLightningModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "model.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def mc_items(items: list[dict]) -> list[tuple[str, list[str], int]]:
    """The task's items as the harness asks them: each choice after its target delimiter."""
    return [(item["context"], [" " + c for c in item["choices"]], item["label"]) for item in items]


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def next_token_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p of each token of ids[1:] given the ones before it, in one forward pass."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(dim=-1)
    return logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_the_harness_acc_is_gptlabs_own_multiple_choice_accuracy(
    module: GPTLightningModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)  # the task's data_files are relative to the checkout's root
    model, tokenizer = module.model, module.tokenizer
    assert max(len(item["context"]) for item in ITEMS) > CONTEXT_LENGTH
    assert max(len(c) for item in ITEMS for c in item["choices"]) > CONTEXT_LENGTH
    # ... and the shortest items are padded in a batch with longer ones.
    assert min(len(item["context"] + " " + c) for item in ITEMS for c in item["choices"]) < 12
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=GPTLabLM(model, tokenizer, batch_size=4),
        tasks=["gptlab_mc"],
        task_manager=manager,
        log_samples=True,
    )
    accuracy = multiple_choice_accuracy(model, tokenizer, mc_items(ITEMS))
    assert results["results"]["gptlab_mc"]["acc,none"] == pytest.approx(accuracy)
    samples = results["samples"]["gptlab_mc"]
    assert len(samples) == len(ITEMS)
    for sample in samples:
        harness = [logprob for logprob, _ in sample["filtered_resps"]]
        ours = [continuation_logprob(model, tokenizer, *pair) for pair in sample["arguments"]]
        assert harness == pytest.approx(ours, rel=1e-5)


def test_loglikelihood_is_a_forward_pass_over_the_context_cut_from_the_left(
    module: GPTLightningModule,
) -> None:
    model, tokenizer = module.model, module.tokenizer
    context = "The for statement iterates over a sequence, in"
    assert len(context) > CONTEXT_LENGTH
    # One token, so that generation sees the same last CONTEXT_LENGTH characters as scoring.
    prompt = tokenizer.encode(context)[-CONTEXT_LENGTH:]
    greedy_ids = continue_prompt(model, prompt, 1)[len(prompt) :]
    continuations = [tokenizer.decode(greedy_ids), " order."]
    lm = GPTLabLM(model, tokenizer, batch_size=2)
    answers = lm.loglikelihood([request("loglikelihood", context, c) for c in continuations])
    for continuation, (logprob, is_greedy) in zip(continuations, answers, strict=True):
        ids = tokenizer.encode(context + continuation)[-(CONTEXT_LENGTH + 1) :]
        n = len(continuation)
        assert logprob == pytest.approx(float(next_token_logprobs(model, ids)[-n:].sum()), rel=1e-5)
        with torch.no_grad():
            predicted = model(torch.tensor([ids[:-1]]))[0, -n:].argmax(-1).tolist()
        assert is_greedy == (predicted == ids[-n:])
    assert [is_greedy for _, is_greedy in answers] == [True, False]


def test_loglikelihood_rolling_scores_the_windows_the_harness_cuts(
    module: GPTLightningModule,
) -> None:
    model, tokenizer = module.model, module.tokenizer
    texts = [TEXT, TEXT[:20], TEXT[:3]]
    lm = GPTLabLM(model, tokenizer, batch_size=2)
    answers = lm.loglikelihood_rolling([request("loglikelihood_rolling", text) for text in texts])
    for text, logprob in zip(texts, answers, strict=True):
        ids = tokenizer.encode(text)
        # A char model has no <|endoftext|>: its first character is the prefix, not scored.
        windows = get_rolling_token_windows(ids[1:], ids[0], CONTEXT_LENGTH, context_len=1)
        expected = 0.0
        for context, predicted in map(make_disjoint_window, windows):
            sequence = (context + predicted)[-(CONTEXT_LENGTH + 1) :]
            expected += float(next_token_logprobs(model, sequence)[-len(predicted) :].sum())
        assert logprob == pytest.approx(expected, rel=1e-5)


def test_generate_until_is_greedy_decoding_cut_before_the_first_stop_string(
    module: GPTLightningModule,
) -> None:
    model, tokenizer = module.model, module.tokenizer
    context = "The for statement iterates over a sequence, in"
    prompt = tokenizer.encode(context)[-CONTEXT_LENGTH:]
    full = tokenizer.decode(continue_prompt(model, prompt, 20)[len(prompt) :])
    # A stop string that first appears inside the text, so the cut is not at its start.
    at = next(i for i in range(1, len(full) - 1) if full.find(full[i : i + 2]) == i)
    stop = full[at : at + 2]
    lm = GPTLabLM(model, tokenizer)
    answers = lm.generate_until(
        [
            request("generate_until", context, {"until": ["#", stop], "max_gen_toks": 20}),
            request("generate_until", context, {"until": "#", "max_gen_toks": 20}),
        ]
    )
    assert answers == [full[:at], full]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ({"tasks": ""}, "tasks=''"),
        ({"tasks": [1]}, "tasks=[1]"),
        ({"text_file": "notes.txt"}, "leave out text_file="),
        ({"limit": 0}, "limit=0"),
        ({"limit": 1.5}, "limit=1.5"),
        ({"num_fewshot": -1}, "num_fewshot=-1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"include_path": "no/such/folder"}, "include_path='no/such/folder' is not a folder"),
    ],
)
def test_bad_harness_settings_are_named(setting: dict, named: str) -> None:
    settings = {"tasks": "gptlab_mc", "text_file": None, "limit": None, "num_fewshot": None}
    settings |= {"batch_size": 8, "include_path": None}
    with pytest.raises(ConfigError) as raised:
        check_harness_config(OmegaConf.create({**settings, **setting}))
    assert named in str(raised.value)


def test_a_comma_string_and_a_list_name_the_same_tasks() -> None:
    settings = {"text_file": None, "limit": 5, "num_fewshot": 0, "batch_size": 8}
    settings["include_path"] = None
    as_string = check_harness_config(OmegaConf.create({**settings, "tasks": "a, b"}))
    as_list = check_harness_config(OmegaConf.create({**settings, "tasks": ["a", "b"]}))
    assert as_string == as_list == ["a", "b"]


@pytest.mark.slow  # lm-eval indexes its whole task library first
def test_a_task_whose_data_cannot_be_read_is_reported(tmp_path: Path) -> None:
    # The task and its data file renamed: the YAML is found, its items are not.
    task = (TASKS_DIR / "gptlab_mc.yaml").read_text().replace("gptlab_mc", "gptlab_missing")
    assert "tests/lm_eval_tasks/gptlab_missing.jsonl" in task
    (tmp_path / "gptlab_missing.yaml").write_text(task)
    with pytest.raises(ConfigError, match=r"^tasks: 'gptlab_missing' could not load its data"):
        load_tasks(["gptlab_missing"], str(tmp_path))


@pytest.mark.slow
def test_evaluate_runs_a_local_task_and_writes_its_results_beside_the_checkpoint(
    ckpt: Path, tmp_path: Path
) -> None:
    result = run_script(
        "evaluate.py",
        f"ckpt={ckpt}",
        "tasks=gptlab_mc",
        "include_path=tests/lm_eval_tasks",
        "limit=6",
        env={"HF_DATASETS_CACHE": str(tmp_path / "datasets")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "|gptlab_mc|" in result.stdout.replace(" ", "")
    written = ckpt.parent / "lm_eval-model-gptlab_mc.json"
    assert f"Results: {written}" in result.stdout
    reported = json.loads(written.read_text())["results"]["gptlab_mc"]
    module = load_checkpoint(ckpt)
    accuracy = multiple_choice_accuracy(module.model, module.tokenizer, mc_items(ITEMS[:6]))
    assert reported["acc,none"] == pytest.approx(accuracy)


@pytest.mark.slow  # lm-eval indexes its whole task library first
def test_an_unknown_task_is_named_before_the_model_is_loaded(tmp_path: Path) -> None:
    # The checkpoint does not exist: loading it first would report that instead.
    result = run_script("evaluate.py", f"ckpt={tmp_path / 'missing.ckpt'}", "tasks=hellaswg")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "'hellaswg' is not a task" in message
    assert "Did you mean hellaswag" in message
    assert "lm-eval ls tasks" in message and "include_path=" in message


def test_a_missing_lm_eval_says_how_to_install_it(tmp_path: Path) -> None:
    # An lm_eval package that cannot be imported, found before the installed one.
    shadow = tmp_path / "shadow" / "lm_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'lm_eval'\")\n"
    )
    result = run_script(
        "evaluate.py",
        f"ckpt={tmp_path / 'missing.ckpt'}",
        "tasks=hellaswag",
        env={"PYTHONPATH": str(shadow.parent)},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "lm-evaluation-harness" in message
    assert 'pip install -e ".[eval]"' in message
    assert "missing.ckpt" not in message
