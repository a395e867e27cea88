"""Template store (PostgreSQL+pgvector), FAISS hot index, Redis change feed and tombstones, the matcher.

Imports ``crypto`` only; the appliance wires these pieces into its per-process index service.
"""

import os

# FAISS uses OpenMP. With the default (active) wait policy its idle worker threads spin after every
# parallel region; in a server where many request threads search concurrently that spinning costs
# more CPU than the searches themselves. Must be set before libgomp loads (before `import faiss`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
