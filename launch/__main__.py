from tlaunch.cli import main

raise SystemExit(main())
