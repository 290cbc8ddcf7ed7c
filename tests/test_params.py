import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.params import Params, ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_validate():
    load_params(ROOT / "params.yaml")
    load_params(ROOT / "real" / "params.yaml")


def test_schema_defaults_are_params_yaml():
    """Defaults live in params.yaml: the schema's own defaults must say the same, key by key."""
    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    schema = dict(leaves(Params().model_dump()))
    documented = dict(leaves(load_params(ROOT / "params.yaml").model_dump()))
    assert {k: v for k, v in schema.items() if documented.get(k) != v} == {}
    raw = dict(leaves(yaml.safe_load((ROOT / "params.yaml").read_text())))
    assert sorted(set(schema) - set(raw)) == []  # every key is written down in params.yaml


@pytest.mark.parametrize("name", ["params.yaml", "real/params.yaml"])
def test_dvc_exp_run_set_changes_only_the_value_it_sets(tmp_path, name):
    """`dvc exp run -S` rewrites params.yaml through DVC's writer (`apply_overrides`); the files are kept
    in that form (block lists, empty nulls), so an experiment's diff is the one line it set."""
    from dvc.utils.hydra import apply_overrides
    text = (ROOT / name).read_text()
    copy = tmp_path / "params.yaml"
    copy.write_text(text)
    epochs = yaml.safe_load(text)["train"]["epochs"]
    apply_overrides(copy, [f"train.epochs={epochs + 1}"])
    before, after = text.splitlines(), copy.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(changed) == 1 and changed[0][1].split("#")[0].split() == ["epochs:", str(epochs + 1)]


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.write_bytes(b"data:\n  seed: \xff\xfe\n")])
def test_unreadable_params_file_is_one_line(tmp_path, capsys, make):
    path = tmp_path / "params.yaml"
    make(path)
    with pytest.raises(ParamsError) as e:
        load_params(path)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: cannot read") and "\n" not in err


@pytest.mark.parametrize("mutate, key", [
    (lambda r: r["data"].update(sourse="csv"), "data.sourse"),
    (lambda r: r["tokenize"].update(vocab_size="big"), "tokenize.vocab_size"),
    (lambda r: r["tokenize"].update(context_length=-1), "tokenize.context_length"),
    (lambda r: r["data"].update(source="csv"), "data"),
    (lambda r: r.update(trian={}), "trian"),
    (lambda r: r["train"].update(crop_ratio=[1.2, 0.9]), "train"),
    (lambda r: r["train"].update(precision="fp8"), "train.precision"),
    (lambda r: r["train"].update(ssl_crop_scale=[0.0, 1.0]), "train"),
    (lambda r: r["train"].update(ssl_temperature=0), "train.ssl_temperature"),
    (lambda r: r["data"]["csv"].update(sep="\\t"), "data.csv.sep"),
    (lambda r: r["data"].update(max_pixels=100_000_000), "data.max_pixels"),  # PIL would refuse past its own limit  # '\t' in single quotes: two characters
])
def test_bad_params_name_the_key_in_one_line(tmp_path, capsys, mutate, key):
    path = _write(tmp_path, mutate)
    with pytest.raises(ParamsError) as exc:
        load_params(path)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith(f"{path}: {key}")


@pytest.mark.parametrize("classnames, bad", [("{'1': one, 01: two}", "1"), ("{'1': [x, y]}", "['x', 'y']"),
                                              ("[a, null]", "None"), ("{yes: a}", "True")])
def test_class_names_yaml_would_misread_are_refused_not_converted(tmp_path, capsys, classnames, bad):
    """YAML reads 01 as 1 (one key with '1'), null as None, yes as True: str() would give other labels."""
    path = tmp_path / "params.yaml"
    text = (ROOT / "params.yaml").read_text()
    path.write_text(text.replace("  datasets: {}", f"  datasets:\n    a: {{path: a.csv, classnames: {classnames}}}"))
    with pytest.raises(ParamsError):
        load_params(path)
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}: evaluate.datasets.a.classnames") and f"YAML read {bad}" in err
    assert "quote labels" in err and len(err.splitlines()) == 1
    path.write_text(text.replace("  datasets: {}", "  datasets:\n    a: {path: a.csv, classnames: {'01': one, 'null': 'yes'}}"))
    assert load_params(path).evaluate.datasets["a"].classnames == {"01": "one", "null": "yes"}


def test_stage_exits_cleanly_on_bad_params(tmp_path):
    _write(tmp_path, lambda r: r["tokenize"].update(vocab_size=0))
    proc = subprocess.run([sys.executable, "-m", "pipeline.tokenize"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "params.yaml: tokenize.vocab_size: Input should be greater than or equal to 300"


def test_benchmark_overrides_follow_dvc_exp_run_set():
    """benchmarks/pipeline_time.py's -S: YAML values into existing keys; a typo is an error, not a new key."""
    spec = importlib.util.spec_from_file_location("pipeline_time", ROOT / "benchmarks" / "pipeline_time.py")
    pipeline_time = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline_time)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for assignment in ("train.epochs=60", "train.betas=[0.9, 0.95]", "export.champion_metric=null"):
        pipeline_time.override(params, assignment)
    assert params["train"]["epochs"] == 60 and params["train"]["betas"] == [0.9, 0.95]
    assert params["export"]["champion_metric"] is None
    for bad, message in (("train.epoch=3", "no key 'train.epoch'"), ("trian.epochs=3", "no section 'trian'"),
                         ("train.epochs", "expected key=value")):
        with pytest.raises(SystemExit, match=message):
            pipeline_time.override(params, bad)


def test_checkpoint_fingerprint_follows_only_settings_that_change_the_weights():
    """SLIP's temperature and crop change nothing while its weight is 0, nor the stream's shuffle
    buffer on the npy route, so they cannot orphan a checkpoint (or every run trained before they existed)."""
    from pipeline.run import run_fingerprint
    p = load_params(ROOT / "params.yaml")
    fp = lambda **train: run_fingerprint(p.model_copy(update={"train": p.train.model_copy(update=train)}), "d", "k")  # noqa: E731
    assert p.train.ssl_weight == 0 and fp() == fp(ssl_temperature=0.5, ssl_crop_scale=(0.2, 1.0))
    assert len({fp(), fp(ssl_weight=1.0), fp(ssl_weight=1.0, ssl_temperature=0.5), fp(resume=False, seed=1)}) == 4
    # the shuffle buffer orders the tar stream only
    assert fp() == fp(shuffle_buffer=16)
    streamed = lambda **train: run_fingerprint(p.model_copy(update={"train": p.train.model_copy(update=train)}), "d", "k",  # noqa: E731
                                               streamed=True)
    assert streamed() != streamed(shuffle_buffer=16)
