"""The typed config (hpcprune/schema.py): one default per key, every config option composes, and
the schema changes no value of the config a run saves.

- config.yaml holds every default; the schema only types (every field MISSING), and config.yaml
  sets every key the schema has and no other (outside model, data, launcher, hydra);
- the schema's choices are the ones the code knows (methods, criteria, group kinds, costs);
- every option of every config group (model=, data=, launcher=, +experiment=, and examples/conf's
  own configs as README and examples/README.md use them) composes and validates;
- composing with the schema saves the same config (keys, values, order) as without it;
- a config composed without the schema is typed by ``validate`` (one line naming the key).
"""
import glob
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import compose
from hpcprune import schema
from hpcprune.config import ConfigError, flat, validate
from hpcprune.sweep import _DryHydra, _hydra_args, precheck_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "hpcprune", "conf")
EXAMPLES = os.path.join(ROOT, "examples")


def _options(group):
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(CONF, group, "*.yaml")))


def test_schema_has_no_defaults():
    """One default per key: the schema's fields are all MISSING, config.yaml's values are the defaults."""
    node = OmegaConf.structured(schema.SweepConfig)
    assert set(OmegaConf.missing_keys(node)) == set(schema.keys()) | set(schema.OPEN)


def test_yaml_sets_every_schema_key_and_no_other():
    raw = yaml.safe_load(open(os.path.join(CONF, "config.yaml")))
    assert raw["defaults"][0] == schema.SCHEMA_NAME  # first: every later config and override is typed
    own = {k: v for k, v in raw.items() if k not in ("defaults", "hydra", *schema.OPEN)}
    assert list(flat(own)) == schema.keys()  # the same keys, in the same order
    cfg = compose([])
    assert OmegaConf.get_type(cfg) is schema.SweepConfig
    assert not [k for k in OmegaConf.missing_keys(cfg) if not k.startswith(schema.OPEN)]


def test_choices_are_the_codes():
    from hpcprune.allocate import COSTS, METHODS
    from hpcprune.graph import KINDS
    from hpcprune.importance import CRITERIA
    from hpcprune.sensitivity import DAMAGES

    assert tuple(schema.Method) == METHODS
    assert tuple(schema.Damage) == DAMAGES
    assert tuple(schema.Importance) == CRITERIA
    assert tuple(schema.GroupKind) == KINDS
    assert tuple(k.rpartition(".")[2] for k in schema.keys() if k.startswith("prune.target.")) == COSTS


def test_choices_are_plain_strings():
    """The code compares, prints and stores a choice as the string it was before the schema."""
    cfg = compose(["prune.method=global", "groups.kinds=[heads,block]"])
    assert cfg.prune.method == "global" and str(cfg.prune.method) == "global" and f"{cfg.importance}" == "l2"
    assert [str(k) for k in cfg.groups.kinds] == ["heads", "block"]
    saved = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    assert saved["prune"]["method"] == "global" and saved["groups"]["kinds"] == ["heads", "block"]
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # the fine-tune job's copy
    assert type(plain["importance"]) is str


CHOICES = ([f"model={m}" for m in _options("model")] + [f"data={d}" for d in _options("data")]
           + [f"launcher={name}" for name in _options("launcher")] + [f"+experiment={e}" for e in _options("experiment")])


@pytest.mark.parametrize("choice", CHOICES)
def test_every_config_option_composes(choice):
    """What the sweep's entry point composes before Hydra (one line on any error: none here), and
    the composed config validates (the custom options leave only ``_target_`` to the user)."""
    overrides = [choice] + ([f"{choice.split('=')[0]}._target_=pkg.fn"] if choice.endswith("=custom") else [])
    assert precheck_argv(overrides) is None
    validate(compose(overrides))


@pytest.mark.parametrize("argv", [
    ["--config-dir", "examples/conf", "model=my_cnn", "data=my_digits"],
    ["hydra.searchpath=[file://examples/conf]", "model=my_cnn", "data=my_digits"],
    ["--config-dir", "examples/conf", "--config-name", "my_run"],
    ["model._target_=my_models.cnn", "data._target_=my_models.digits"],
], ids=["config-dir", "searchpath", "config-name", "targets"])
def test_readme_commands_compose(argv, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert precheck_argv(argv) is None
    from hpcprune.sweep import own_target_argv

    argv = own_target_argv(argv)
    args = _hydra_args(argv)
    with _DryHydra(args) as dry:
        cfg = dry.compose(list(args.overrides))
    assert OmegaConf.get_type(cfg) is schema.SweepConfig
    validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


UNTYPED = "untyped_config"  # config.yaml without the schema: the config hpcprune composed before it


@pytest.mark.parametrize("overrides", [
    [], ["model=tiny_gpt", "data=text"], ["+experiment=smollm2_austen"], ["launcher=slurm", "groups.kinds=[channels]"],
    ["sensitivity.team_size=2", "sensitivity.early_stop_floor=0.9", "prune.target.latency=0.5", "seed=3"],
    ["model._target_=pkg.fn", "+model.width=3"],
])
def test_schema_changes_no_saved_value(tmp_path, overrides):
    """The config a run saves (resolved YAML) is the same text with the schema as without it."""
    from hpcprune.sweep import own_target_argv

    text = open(os.path.join(CONF, "config.yaml")).read()
    assert f"  - {schema.SCHEMA_NAME}\n" in text
    (tmp_path / f"{UNTYPED}.yaml").write_text(text.replace(f"  - {schema.SCHEMA_NAME}\n", ""))
    saved = []
    for argv in ([], ["--config-dir", str(tmp_path), "--config-name", UNTYPED]):
        argv = own_target_argv([*argv, *overrides])
        args = _hydra_args(argv)
        with _DryHydra(args) as dry:
            cfg = dry.compose(list(args.overrides))
        assert (OmegaConf.get_type(cfg) is schema.SweepConfig) == (not args.config_name)
        body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        saved.append(OmegaConf.to_yaml(body, resolve="custom" not in " ".join(argv)))
    assert saved[0] == saved[1]


@pytest.mark.parametrize("body,line", [
    ("threads: abc", "In 'mine': threads: Value 'abc' of type 'str' could not be converted to Integer"),
    ("prune:\n  method: magic", "In 'mine': prune.method: Invalid value 'magic', expected one of [uniform, global, sensitivity]"),
    ("baseline:\n  epoch: 3", "In 'mine': baseline.epoch: Key 'epoch' not in 'BaselineConfig' (did you mean epochs?)"),
])
def test_bad_value_in_a_config_file_one_line(tmp_path, body, line):
    (tmp_path / "mine.yaml").write_text(f"defaults:\n  - config\n  - _self_\n{body}\n")
    assert precheck_argv(["--config-dir", str(tmp_path), "--config-name", "mine"]) == line


def test_untyped_config_is_typed_by_validate():
    """A config composed without the schema: validate types it, one line naming the key."""
    good = OmegaConf.to_yaml(compose([]))
    validate(OmegaConf.create(good))
    for change, line in [
        ({"prune": {"method": "magic"}}, "prune.method=magic: Invalid value 'magic', expected one of [uniform, global, sensitivity]"),
        ({"threads": "x"}, "threads=x: Value 'x' of type 'str' could not be converted to Integer"),
    ]:
        cfg = OmegaConf.merge(OmegaConf.create(good), change)
        with pytest.raises(ConfigError) as e:
            validate(cfg)
        assert str(e.value) == line
    cfg = OmegaConf.create(good)
    del cfg.groups["timeout_s"]
    with pytest.raises(ConfigError, match=r"^groups.timeout_s: not set"):
        validate(cfg)


def test_deleted_key_is_refused_by_validate():
    with pytest.raises(ConfigError, match=r"^threads: not set"):
        validate(compose(["~threads"]))


def test_registered_before_hydra_composes():
    """A fresh interpreter that composes the packaged config with Hydra alone (as tests and users'
    scripts do) gets the typed config: reading hpcprune.conf registers the schema."""
    code = ("from hydra import compose, initialize_config_module\n"
            "with initialize_config_module('hpcprune.conf', version_base=None):\n"
            "    cfg = compose('config')\n"
            "from omegaconf import OmegaConf\n"
            "print(OmegaConf.get_type(cfg).__name__)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "SweepConfig", p.stderr
