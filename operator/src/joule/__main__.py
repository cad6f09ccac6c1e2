from joule.cli import main

raise SystemExit(main())
