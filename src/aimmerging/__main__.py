import sys

try:
    from .cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the command line module is imported
    print("aimmerging: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
