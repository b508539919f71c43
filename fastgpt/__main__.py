from fastgpt.cli import main

raise SystemExit(main())
