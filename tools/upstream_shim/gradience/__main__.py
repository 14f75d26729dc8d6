import sys

from gradience_lite import main  # `gradience audit …` → `gradience-lite audit …`

sys.exit(main())
