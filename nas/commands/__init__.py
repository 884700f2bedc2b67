"""Sub-commands of `detforge`; every module here has `register(subparsers)`."""
