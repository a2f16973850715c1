"""The run-time type checker of the test suite (``--jaxtyping-packages`` in pyproject.toml).

beartype with the PEP 484 numeric tower: an ``int`` is accepted where ``float`` is annotated,
as mypy and the Python typing rules accept it.
"""

from beartype import BeartypeConf, beartype

typechecker = beartype(conf=BeartypeConf(is_pep484_tower=True))
