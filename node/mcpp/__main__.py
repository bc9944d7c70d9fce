from mcpp.cli import main

raise SystemExit(main())
