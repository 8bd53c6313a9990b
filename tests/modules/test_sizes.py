"""The model's sizes are declared once, in ``TransformerConfig``, and every module takes all of them.

Each module forwards its other keyword arguments down to ``SupervisedExitLM``, which builds the
config from them; the CLI resolves that chain, so ``--model.d_model`` and ``--print_config`` keep
working and a field added to ``TransformerConfig`` reaches every module and command line.
"""

import dataclasses

import pytest
import yaml

from lego_lightning import ASHEM, Phase, PhasedExitLM, ProgressiveExitLM, SupervisedExitLM, TransformerConfig
from lego_lightning.cli import main
from lego_lightning.modules.supervised_exit import SIZE_FIELDS
from tests.helpers import cli_args

# A module class, a config that runs it, the sizes it does not take, and the defaults it changes on purpose.
MODULES = [
    (SupervisedExitLM, "standard.yaml", (), {}),
    (PhasedExitLM, "progressive_3_to_6.yaml", ("n_layers",), {}),  # the plan sets the depth
    (ASHEM, "ashem.yaml", ("n_layers",), {"head_sharing": "separate"}),  # the shallow exit's head stays frozen
    (ProgressiveExitLM, "progressive_standard.yaml", ("n_layers",), {}),
]
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TransformerConfig) if f.name in SIZE_FIELDS}


def build(cls, **sizes):
    plan = {"phases": [Phase(layers=2, max_epochs=1, patience=1)]} if cls is PhasedExitLM else {}
    return cls(vocab_size=40, max_seq_len=16, **plan, **sizes)


@pytest.mark.parametrize(("cls", "config", "derived", "changed"), MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_print_config_shows_every_size_with_its_one_default(corpus, tmp_path, capsys, cls, config, derived, changed):
    # The committed configs set some sizes; a size they leave out shows TransformerConfig's default.
    with pytest.raises(SystemExit) as done:
        main([*cli_args("fit", config, corpus, tmp_path, "--model.d_model", "48"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert printed["class_path"].endswith(cls.__name__)
    args = printed["init_args"]
    assert set(SIZE_FIELDS) - set(derived) <= set(args)
    assert not set(derived) & set(args)
    assert args["d_model"] == 48  # the command line wins
    for name, default in {**DEFAULTS, **changed}.items():
        if name in derived or name in ("d_model", "max_seq_len", "dropout", "n_layers"):
            continue  # set by the committed configs
        assert args[name] == default, name


@pytest.mark.parametrize(("cls", "config", "derived", "changed"), MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_python_sizes_reach_the_model(cls, config, derived, changed):
    module = build(cls, d_model=24, n_heads=3, d_ff=40, positions="rotary", dropout=0.2)
    assert (module.config.d_model, module.config.n_heads, module.config.d_ff) == (24, 3, 40)
    assert (module.config.positions, module.config.dropout) == ("rotary", 0.2)
    assert module.model.blocks[0].mlp.fc.out_features == 40
    default = build(cls)
    for name, value in {**DEFAULTS, **changed}.items():
        if name not in derived and name != "max_seq_len":
            # None for these three means "derived": 4 x d_model, one key/value head per query head, and
            # heads that split d_model.
            derived_values = {
                "d_ff": 4 * default.config.d_model,
                "n_kv_heads": default.config.n_heads,
                "head_dim": default.config.d_model // default.config.n_heads,
            }
            expected = derived_values.get(name, value)
            assert getattr(default.config, name) == expected, name


@pytest.mark.parametrize(("cls", "config", "derived", "changed"), MODULES, ids=lambda v: getattr(v, "__name__", ""))
def test_a_misspelt_size_is_refused_with_the_sizes_named(cls, config, derived, changed):
    with pytest.raises(TypeError, match=r"got unexpected arguments \['d_modle'\]: the model's sizes are \['n_layers'"):
        build(cls, d_modle=32)


@pytest.mark.parametrize("cls", [PhasedExitLM, ASHEM, ProgressiveExitLM])
def test_a_phased_module_refuses_n_layers_because_its_plan_sets_the_depth(cls):
    with pytest.raises(ValueError, match=r"n_layers=6 is not an argument of .*: the depth is each phase's layers"):
        build(cls, n_layers=6)
