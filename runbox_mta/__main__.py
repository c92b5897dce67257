from runbox_mta.cli import main

raise SystemExit(main())
