"""The avatar worker by hand: joins a LiveKit room as the avatar of its agent.

`LipsyncAvatarSession` (agent.py) starts this for each room by itself (as
`python -m lipsync.agents.livekit`); run it by hand to host the avatar elsewhere, e.g. on
the machine next to the lipsync services:

    LIPSYNC_LIVEKIT_TOKEN=<token> python examples/livekit_agent/avatar_worker.py \
        --url wss://<project>.livekit.cloud --address localhost:50052 --model demo

The token must let it join the room and carry `lk.publish_on_behalf` = the agent's
identity (`lipsync.agents.livekit.avatar_token` makes one), and the agent must send its
audio to this worker's identity with `DataStreamAudioOutput`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from lipsync.agents.livekit import main

if __name__ == "__main__":
    sys.exit(main())
