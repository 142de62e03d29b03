"""The subcommands of `t5hooks`, one module each; each has `register(subparsers)`."""
