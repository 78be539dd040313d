"""``python -m hybridpar`` is the ``hybridpar`` command (:mod:`hybridpar.cli`)."""
from hybridpar.cli import main

raise SystemExit(main())
