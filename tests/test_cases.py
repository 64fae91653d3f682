"""The case table (tests/cases.py) as derived from the rules' declarations: what every rule's
draws cover, whatever options a rule declares."""
import pytest

from cases import FIXED, LAST, N_DRAWS, _within_checks, hparams
from fastopt.kernels import RULES
from fastopt.kernels._rule import Hyper


def _draws(rule):
    declared = RULES[rule][0]
    return declared, [{**declared.defaults, **hparams(rule, i)} for i in range(N_DRAWS)]


def _drawn(declared):
    """The options the table moves: a bool, or one with a declared range."""
    return [h for h in declared.hyper.values() if h.sample is not None or isinstance(h.default, bool)]


@pytest.mark.parametrize("rule", list(RULES))
def test_every_draw_passes_the_rules_checks(rule):
    declared, draws = _draws(rule)
    for i, hp in enumerate(draws):
        declared.check(hp)  # raises with the rule's message
        assert set(hparams(rule, i)) <= set(declared.hyper), f"draw {i} sets what {rule} does not declare"


@pytest.mark.parametrize("rule", list(RULES))
def test_draw_zero_is_the_defaults_and_every_draw_is_the_same_each_time(rule):
    assert hparams(rule, 0) == FIXED.get(rule, {})
    assert [hparams(rule, i) for i in range(N_DRAWS)] == [hparams(rule, i) for i in range(N_DRAWS)]


@pytest.mark.parametrize("rule", list(RULES))
def test_every_bool_is_on_in_one_draw_and_off_in_another(rule):
    declared, draws = _draws(rule)
    for h in declared.hyper.values():
        if isinstance(h.default, bool):
            seen = {hp[h.name] for hp in draws}
            assert seen == {True, False}, f"{rule}.{h.name} is only ever {seen}"


@pytest.mark.parametrize("rule", list(RULES))
def test_every_option_with_a_range_varies_within_it(rule):
    declared, draws = _draws(rule)
    for h in _drawn(declared):
        if h.sample is None or h.sample[0] == "choice":
            continue
        values = [hp[h.name] for hp in draws]
        assert len(set(values)) > 1, f"{rule}.{h.name} is {values[0]} in every draw"
        for value in values:
            if value == h.default:
                continue
            ranges = h.sample if isinstance(h.default, tuple) else (h.sample,)
            for element, (_, lo, hi) in zip(value if isinstance(value, tuple) else (value,), ranges):
                assert lo <= element <= hi, f"{rule}.{h.name} = {value} outside {h.sample}"


@pytest.mark.parametrize("rule", list(RULES))
def test_options_torch_lacks_move_in_the_last_draw_only_and_the_others_before_it(rule):
    """The torch parity tests skip the last draw where it moves an option torch lacks: every
    option torch has must move in a draw before it, to be compared with torch at all."""
    declared, draws = _draws(rule)
    for h in _drawn(declared):
        moved = [i for i, hp in enumerate(draws) if hp[h.name] != h.default]
        if h.torch:
            assert any(i < LAST for i in moved), f"{rule}.{h.name} moves only in draws {moved}"
        elif h.sample is None or h.sample[0] != "choice":  # a choice may land on its default
            assert moved == [LAST], f"{rule}.{h.name} (torch has none) moves in draws {moved}"


# (rule, a draw its checks reject, what is left of it)
REJECTED = [
    ("sgd", dict(momentum=0.9, dampening=0.1, nesterov=True, maximize=True),
     dict(momentum=0.9, dampening=0.1, maximize=True)),
    ("sgd", dict(dampening=0.1, nesterov=True), dict(dampening=0.1)),
    ("adam", dict(lr=-1.0, amsgrad=True), dict(amsgrad=True)),
]


@pytest.mark.parametrize("rule,hp,left", REJECTED, ids=["nesterov-dampening", "nesterov-no-momentum", "lr"])
def test_a_rejected_draw_gives_back_the_fewest_options_last_declared_first(rule, hp, left):
    assert _within_checks(RULES[rule][0], hp) == left


BAD_SAMPLES = [
    ("no-kind", 0.1, (1e-3, 1e-1)),
    ("unknown-kind", 0.1, ("normal", 0.0, 1.0)),
    ("empty-range", 0.1, ("uniform", 1.0, 1.0)),
    ("log-from-zero", 0.1, ("log", 0.0, 1.0)),
    ("empty-choice", "a", ("choice",)),
    ("pair-one-range", (0.9, 0.999), ("uniform", 0.5, 0.9)),
]


@pytest.mark.parametrize("default,sample", [c[1:] for c in BAD_SAMPLES], ids=[c[0] for c in BAD_SAMPLES])
def test_a_malformed_sample_fails_at_declaration(default, sample):
    with pytest.raises(TypeError, match=r"^x: "):
        Hyper("x", default, sample=sample)


@pytest.mark.parametrize("samples", [{"decoupled_weight_decay": ("choice", True)}, {"nope": ("uniform", 0.0, 1.0)}],
                         ids=["fixed", "undeclared"])
def test_a_variant_rejects_ranges_for_options_it_does_not_keep(samples):
    with pytest.raises(TypeError, match="which the variant does not keep"):
        RULES["adam"][0].variant("x", fixed={"decoupled_weight_decay": True}, defaults={}, samples=samples)
