"""``python -m adjointdpm …``: the ``adjointdpm`` command (also what ``torchrun -m adjointdpm`` runs)."""
from .cli import main

if __name__ == "__main__":
    main()
