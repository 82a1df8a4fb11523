import sys

from edgelm.edge_bench.bench import main

sys.exit(main())
