"""The case table (tests/cases.py) as derived from the rules' declarations: what every rule's
draws cover, whatever options a rule declares; every optimizer's rule, LAMB's and LARS's too."""
import pytest

from cases import DECLARED, FIXED, LAST, N_DRAWS, _within_checks, hparams, sharing_kernels
from fastopt.kernels import RULES, lamb, lars
from fastopt.kernels._rule import Hyper


def _draws(rule):
    declared = DECLARED[rule]
    return declared, [{**declared.defaults, **hparams(rule, i)} for i in range(N_DRAWS)]


def _drawn(declared):
    """The options the table moves: a bool, or one with a declared range."""
    return [h for h in declared.hyper.values() if h.sample is not None or isinstance(h.default, bool)]


def _off(h):
    """(True, the value that turns ``h`` off) for an on/off option by its declaration, else
    (False, None): a bool (off at its default), a number with a range whose default 0 or None
    is off, or one that declares its ``off`` value."""
    if isinstance(h.default, bool):
        return True, h.default
    if h.sample is None or h.sample[0] == "choice":
        return False, None
    if h.off is not None:
        return True, h.off
    return h.default is None or h.default == 0, h.default


def test_every_rule_has_a_table():
    """The element-wise rules and the per-tensor ones (outside RULES: fastopt.layerwise's)."""
    for name, (rule, _, _) in RULES.items():
        assert DECLARED.get(name) is rule, f"{name} has no table"
    assert DECLARED.get("lamb") is lamb.LAMB and DECLARED.get("lars") is lars.LARS


@pytest.mark.parametrize("rule", list(DECLARED))
def test_every_draw_passes_the_rules_checks(rule):
    declared, draws = _draws(rule)
    for i, hp in enumerate(draws):
        declared.check(hp)  # raises with the rule's message
        assert set(hparams(rule, i)) <= set(declared.hyper), f"draw {i} sets what {rule} does not declare"


@pytest.mark.parametrize("rule", list(DECLARED))
def test_draw_zero_is_the_defaults_and_every_draw_is_the_same_each_time(rule):
    assert hparams(rule, 0) == FIXED.get(rule, {})
    assert [hparams(rule, i) for i in range(N_DRAWS)] == [hparams(rule, i) for i in range(N_DRAWS)]


@pytest.mark.parametrize("rule", list(DECLARED))
def test_every_on_off_option_is_on_in_one_draw_and_off_in_another(rule):
    """A bool both ways; a number (weight decay, LAMB's clamp_value) at its off value (0, None,
    or its declared ``off``) in one draw and on in another."""
    declared, draws = _draws(rule)
    for h in declared.hyper.values():
        switched, off = _off(h)
        if switched:
            values = [hp[h.name] for hp in draws]
            assert off in values, f"{rule}.{h.name} is never off ({off!r}): {values}"
            assert any(v != off for v in values), f"{rule}.{h.name} is never on: {values}"
        if isinstance(h.default, bool):
            assert {hp[h.name] for hp in draws} == {True, False}, f"{rule}.{h.name} is not drawn both ways"


@pytest.mark.parametrize("rule", list(DECLARED))
def test_every_option_with_a_range_varies_within_it(rule):
    declared, draws = _draws(rule)
    for h in _drawn(declared):
        if h.sample is None or h.sample[0] == "choice":
            continue
        values = [hp[h.name] for hp in draws]
        assert len(set(values)) > 1, f"{rule}.{h.name} is {values[0]} in every draw"
        for value in values:
            if value == h.default or _off(h) == (True, value):
                continue
            ranges = h.sample if isinstance(h.default, tuple) else (h.sample,)
            for element, (_, lo, hi) in zip(value if isinstance(value, tuple) else (value,), ranges):
                assert lo <= element <= hi, f"{rule}.{h.name} = {value} outside {h.sample}"


@pytest.mark.parametrize("rule", list(DECLARED))
def test_every_value_of_a_choice_is_drawn_by_the_rules_sharing_its_math(rule):
    """Adam and AdamW share their kernels, so between them they reach l1_mode's every value."""
    declared = DECLARED[rule]
    pool = sharing_kernels(rule)
    for h in declared.hyper.values():
        if h.sample is None or h.sample[0] != "choice":
            continue
        seen = [{**DECLARED[r].defaults, **hparams(r, i)}[h.name]
                for r in pool if h.name in DECLARED[r].hyper for i in range(N_DRAWS)]
        missing = [v for v in h.sample[1:] if v not in seen]
        assert not missing, f"{rule}.{h.name}: {missing} never drawn by {pool}"


@pytest.mark.parametrize("rule", list(DECLARED))
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
    ("lars", dict(momentum=0.9, dampening=0.1, nesterov=True, trust_clip=True),
     dict(momentum=0.9, dampening=0.1, trust_clip=True)),
]


@pytest.mark.parametrize("rule,hp,left", REJECTED, ids=["nesterov-dampening", "nesterov-no-momentum", "lr",
                                                         "lars-nesterov-dampening"])
def test_a_rejected_draw_gives_back_the_fewest_options_last_declared_first(rule, hp, left):
    assert _within_checks(DECLARED[rule], hp) == left


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


@pytest.mark.parametrize("sample", [None, ("choice", 0.0, 0.1)], ids=["no-range", "choice"])
def test_an_off_value_needs_a_range_to_draw_the_option_on_from(sample):
    with pytest.raises(TypeError, match=r"^x: off=0.0 needs a range"):
        Hyper("x", 0.01, sample=sample, off=0.0)


@pytest.mark.parametrize("samples", [{"decoupled_weight_decay": ("choice", True)}, {"nope": ("uniform", 0.0, 1.0)}],
                         ids=["fixed", "undeclared"])
def test_a_variant_rejects_ranges_for_options_it_does_not_keep(samples):
    with pytest.raises(TypeError, match="which the variant does not keep"):
        RULES["adam"][0].variant("x", fixed={"decoupled_weight_decay": True}, defaults={}, samples=samples)
