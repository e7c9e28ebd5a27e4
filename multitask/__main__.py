from multitask.cli import main

raise SystemExit(main())
