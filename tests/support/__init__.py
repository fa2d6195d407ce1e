"""What the tests share, one module per kind of helper: `models` (checkpoints, greedy runs, sequences), `servers`
(engines, apps, processes, ports, SSE), `deploy` (deployment files), the fake OpenAI server and the classification
eval. Test modules import from here, never from each other."""
