from mergecl.cli import main

raise SystemExit(main())
