"""``python -m lors_hf ...`` is the ``lors-hf`` command line."""

from .cli import main

if __name__ == "__main__":
    main()
