"""``python -m genkit`` (and ``torchrun -m genkit train ...``) run the CLI."""

from genkit.cli import main

if __name__ == "__main__":
    main()
