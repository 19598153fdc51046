"""The stated bounds of a study file: numeric field types that refuse what would only fail mid-run (negative seeds,
infinite rates, images too large to hold), the size of the file and how far its YAML aliases may expand.
Constraints only: they change no dump, so the fingerprints of valid studies stay the same."""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

MAX_IMAGE_SIZE = 2048  # pixels a side: above every timm model's native input; one digits image at 1e6² is 12 TB
MAX_EPOCHS = 10_000
MAX_NAME = 100  # study names and labels become directory, Optuna-study and run names (file names stop at 255 bytes)
MAX_STUDY_BYTES = 1 << 20  # 1 MiB: the largest study in studies/ is a few KiB
MAX_YAML_NODES = 100_000  # values once aliases are expanded: a study has hundreds; an alias bomb has billions

#: numpy, scikit-learn and Optuna take seeds in [0, 2**32)
Seed = Annotated[int, Field(ge=0, lt=2 ** 32)]
#: > 0 and finite (``.inf`` would train to NaN)
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFinite = Annotated[float, Field(ge=0, allow_inf_nan=False)]
ImageSize = Annotated[int, Field(gt=0, le=MAX_IMAGE_SIZE)]
Epochs = Annotated[int, Field(gt=0, le=MAX_EPOCHS)]
TeacherEpochs = Annotated[int, Field(ge=0, le=MAX_EPOCHS)]  # 0: a pretrained teacher used as it is


def expansion_error(data: Any) -> str:
    """'' when ``data`` (as ``yaml.safe_load`` built it, aliases shared) expands to at most MAX_YAML_NODES values;
    else '<field>: <problem>' naming the innermost field that alone is over the bound."""
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in sizes:
            if sizes[id(node)] < 0:  # on the current path: an alias that contains itself
                return MAX_YAML_NODES + 1
            return sizes[id(node)]
        sizes[id(node)] = -1
        children = node.values() if isinstance(node, dict) else node
        total = 1
        for c in children:
            total = min(total + size(c), MAX_YAML_NODES + 1)  # capped: no big-int sums on a bomb
        sizes[id(node)] = total
        return total

    if size(data) <= MAX_YAML_NODES:
        return ""
    path, node = [], data
    while True:  # descend into the child that alone is over the bound
        items = node.items() if isinstance(node, dict) else enumerate(node)
        big = next(((k, c) for k, c in items if sizes.get(id(c), 0) > MAX_YAML_NODES), None)
        if big is None or len(path) > 20:
            break
        path.append(f"[{big[0]}]" if isinstance(big[0], int) else str(big[0]))
        node = big[1]
    field = ".".join(path).replace(".[", "[") or "aliases"
    return f"{field}: expands to more than {MAX_YAML_NODES:,} values (YAML aliases); write it out"
