import pytest

from lego_lightning import Stage, TransformerConfig
from lego_lightning.model import validate_stages


def test_default_stage_covers_all_layers():
    cfg = TransformerConfig(vocab_size=10, n_layers=4)
    assert cfg.stages == (Stage(layers=(1, 4)),)
    assert cfg.exit_layers == (4,)
    assert cfg.d_ff == 4 * cfg.d_model


def test_stages_from_dicts_as_in_yaml_and_checkpoints():
    cfg = TransformerConfig(
        vocab_size=10, n_layers=3, stages=[{"layers": [1, 1], "loss_weight": 0.5}, {"layers": [2, 3]}]
    )
    assert cfg.exit_layers == (1, 3)
    assert cfg.stages[0].loss_weight == 0.5
    assert cfg.stages[0].to_dict() == {
        "layers": [1, 1],
        "loss_weight": 0.5,
        "lr_scale": 1.0,
        "trainable": True,
    }


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([Stage((1, 1)), Stage((3, 4))], r"stages\[1\].layers=\(3, 4\) leaves a gap"),
        ([Stage((1, 2)), Stage((2, 4))], r"stages\[1\].layers=\(2, 4\) leaves an overlap"),
        ([Stage((1, 2)), Stage((3, 5))], r"goes past the model's last layer: allowed 1..4"),
        ([Stage((1, 2)), Stage((3, 3))], r"stages end at layer 3 but the model has n_layers=4"),
        ([Stage((2, 4))], r"must start at layer 1"),
        ([Stage((1, 2), loss_weight=0), Stage((3, 4), loss_weight=0)], r"all stage loss weights are 0"),
    ],
)
def test_bad_stages_name_the_field_and_what_is_allowed(stages, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(vocab_size=10, n_layers=4, stages=stages)


def test_empty_stage_list_is_rejected():
    with pytest.raises(ValueError, match="at least one Stage"):
        validate_stages([], 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": (0, 1)}, r"Stage.layers must satisfy 1 <= first <= last, got \(0, 1\)"),
        ({"layers": (3, 2)}, r"1 <= first <= last, got \(3, 2\)"),
        ({"layers": (1, 2, 3)}, r"Stage.layers must be two integers"),
        (
            {"layers": (1, 2), "loss_weight": -0.1},
            r"Stage.loss_weight must be a finite number >= 0, got -0.1",
        ),
        ({"layers": (1, 2), "loss_weight": float("nan")}, r"Stage.loss_weight"),
        ({"layers": (1, 2), "lr_scale": 0.0}, r"Stage.lr_scale must be a finite number > 0, got 0.0"),
    ],
)
def test_bad_stage_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Stage(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, r"d_model=30 must be divisible by n_heads=4"),
        ({"n_layers": 0}, r"n_layers must be a positive integer, got 0"),
        ({"positions": "alibi"}, r"positions='alibi' is not one of \('learned', 'rotary'\)"),
        ({"n_heads": 4, "n_kv_heads": 3}, r"n_kv_heads must be a positive integer dividing n_heads=4, got 3"),
        ({"norm": "batchnorm"}, r"norm='batchnorm' is not one of \('layernorm', 'rmsnorm'\)"),
        ({"activation": "relu"}, r"activation='relu' is not one of \('gelu', 'gelu_tanh', 'swiglu'\)"),
        ({"rope_base": 0.0}, r"rope_base must be a finite number > 0, got 0.0"),
        ({"head_dim": 0}, r"head_dim must be a positive integer or None, got 0"),
        ({"positions": "rotary", "head_dim": 5}, r"rotary positions need an even head size, got head_dim = 5"),
        (
            {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            r"rope_type='yarn' is not one of \('linear', 'llama3'\)",
        ),
        ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling.factor=None is not allowed: rope_type linear needs"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
            r"original_max_position_embeddings=None is not allowed: rope_type llama3 needs a number > 0",
        ),
        ({"rope_scaling": "llama3"}, r"rope_scaling='llama3' is not allowed: a mapping"),
        ({"head_sharing": "some"}, r"head_sharing='some' is not one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TransformerConfig(vocab_size=10, **kwargs)
