"""``python -m tokops.info``: print which backends were built and for which GPU architectures."""

import json

import tokops


def main() -> None:
    print(json.dumps(tokops.info(), indent=2))


if __name__ == "__main__":
    main()
