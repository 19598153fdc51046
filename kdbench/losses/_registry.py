"""The loss registry: ``@register_loss(name)`` adds a :class:`~kdbench.losses.base.DistillLoss` subclass,
``create_loss(name, **params)`` builds it, ``list_losses()`` names the entries.

An entry's card, ``cards/<name>.yaml``, is the one statement of what the loss ``needs`` (copied onto the class at
registration) and of its default parameters (filled in by ``create_loss``). Listing reads the cards only, so it
imports no torch; the built-in loss modules are imported when a class is first looked up.

Example::

    >>> from kdbench.losses import create_loss, list_losses
    >>> list_losses(family="relation")
    ['crcd', 'eu_mse', 'rkd']
    >>> create_loss("kd").temperature  # the card's default
    4.0
    >>> create_loss("kd", temperature=2).temperature
    2.0
"""
from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, TypeVar

from kdbench.errors import KdbenchError
from kdbench.losses.card import FAMILIES, card_names, card_path, load_card

if TYPE_CHECKING:  # base imports torch, which listing losses must not; for annotations only
    from kdbench.losses.base import DistillLoss

L = TypeVar("L", bound="type[DistillLoss]")

_REGISTRY: dict[str, type[DistillLoss]] = {}
#: modules of this package that register no loss (the rest hold one loss each)
_NOT_LOSSES = frozenset({"base", "card", "outputs", "functional", "combine", "weighting"})
_builtins_loaded = False


def _load_builtins() -> None:
    """Import every loss module of this package once, so that its ``@register_loss`` has run: adding a loss is
    adding one file (and its card)."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name not in _NOT_LOSSES and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")
    _builtins_loaded = True


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator: make a ``DistillLoss`` subclass creatable as ``create_loss(name)``.

    The entry needs a card, ``cards/<name>.yaml``: its ``needs`` are set on the class here (so the class body must
    not state them again) and its ``defaults`` fill the constructor parameters a ``create_loss`` call leaves out.

    Example::

        @register_loss("kd")
        class KDLoss(DistillLoss):
            def __init__(self, temperature: float):  # default: the card's defaults.temperature
                super().__init__()
                self.temperature = temperature
    """

    def decorate(cls: L) -> L:
        if not cls.__module__.startswith(f"{__package__}."):
            _load_builtins()  # an outside entry must not quietly take a built-in's name
        if _REGISTRY.get(name) is cls:
            return cls
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        _refuse_own_needs(name, cls)
        card = load_card(name)
        cls.name = name
        cls.needs = frozenset(card.needs)
        _REGISTRY[name] = cls
        return cls

    return decorate


def _refuse_own_needs(name: str, cls: type) -> None:
    """``needs`` is the card's to state: a class between ``cls`` and DistillLoss that sets it says it twice."""
    from kdbench.losses.base import DistillLoss

    if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
        raise TypeError(f"@register_loss({name!r}) takes a DistillLoss subclass, got {cls!r}")
    for klass in cls.__mro__:
        if klass is DistillLoss or klass in _REGISTRY.values():  # a registered parent got its needs from a card
            break
        if "needs" in vars(klass):
            raise ValueError(
                f"loss {name!r}: {klass.__qualname__} defines needs, and the card {card_path(name)} states them too: "
                "stated twice; remove needs from the class (registration sets it from the card)"
            )


def list_losses(family: Optional[str] = None) -> list[str]:
    """The registry names, sorted; with ``family`` (logit, feature, embedding, relation, self) only that family's.

    Read from the cards: every registered loss has one (registration needs it) and every card a class
    (tests/test_registry_all.py), so this imports no loss module.

    Example::

        >>> list_losses(family="self")
        ['uskd']
    """
    if family is not None and family not in FAMILIES:
        raise KdbenchError(f"unknown loss family {family!r}; known: {', '.join(FAMILIES)}")
    names = card_names()
    return names if family is None else [n for n in names if load_card(n).family == family]


def unknown_loss_message(name: str) -> str:
    known = list_losses()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {', '.join(known)}"
    return f"unknown loss {name!r}{hint}"


def get_loss_class(name: str) -> type[DistillLoss]:
    """The class registered as ``name`` (``get_loss_class("kd")`` is ``KDLoss``); KdbenchError when unknown."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KdbenchError(unknown_loss_message(name)) from None


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    """The constructor's named parameters (no self, no *args/**kwargs)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def loss_parameters(name: str) -> dict[str, object]:
    """The loss's own parameters and their defaults: the constructor's where it states one, else the card's,
    else ``inspect.Parameter.empty`` (required). Every loss that reads logits also takes ``standardize`` (False).

    Example::

        >>> loss_parameters("dkd")
        {'temperature': 4.0, 'alpha': 1.0, 'beta': 8.0, 'warmup': 20, 'standardize': False}
    """
    cls = get_loss_class(name)
    card = load_card(name).defaults
    params: dict[str, object] = {}
    for p in _init_parameters(cls):
        # deep copies: a card's list must not be shared by (and mutated through) the losses built from it
        params[p.name] = p.default if p.default is not p.empty else copy.deepcopy(card.get(p.name, p.empty))
    if "logits" in cls.needs:
        params.setdefault("standardize", False)
    return params


def create_loss(name: str, **params) -> DistillLoss:
    """Build a registered loss by name, the parameters not given taken from :func:`loss_parameters` (the card's
    defaults); unknown names and unknown or missing parameters give one clear error.

    Example::

        >>> create_loss("dkd", beta=2.0).temperature  # beta given, the rest from the card
        4.0
        >>> create_loss("kd", standardize=True).standardize  # logit standardisation (Sun et al., CVPR 2024)
        True
    """
    cls = get_loss_class(name)
    known = loss_parameters(name)
    bad = sorted(set(params) - set(known))
    if bad:
        raise KdbenchError(f"loss {name!r} has no parameter {', '.join(map(repr, bad))}; it takes {sorted(known)}")
    own = {p.name for p in _init_parameters(cls)}
    args = {k: v for k, v in known.items() if k in own and v is not inspect.Parameter.empty}
    args.update((k, v) for k, v in params.items() if k in own)
    missing = sorted(own - set(args))
    if missing:
        raise KdbenchError(f"loss {name!r} needs {', '.join(map(repr, missing))}: neither the call nor its card "
                           f"({card_path(name)}) gives a value")
    loss = cls(**args)
    if "standardize" not in own and params.get("standardize", False):
        loss.standardize = bool(params["standardize"])
    return loss
