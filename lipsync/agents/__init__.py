"""The avatar as the face of a voice agent: pipecat and LiveKit Agents integrations
(docs/AGENTS.md).

`realtime_session.RealtimeAvatarSession` is the framework-neutral part both use: a
realtime `StreamComposite` session that takes speech at any rate and gives paced RGB
frames with their 40 ms of audio, idling while the agent is silent and through an
outage of the service. `lipsync.agents.pipecat` (extra `pipecat`) and
`lipsync.agents.livekit` (extra `livekit`) adapt it to each framework; importing this
package needs neither.
"""

from lipsync.agents.realtime_session import AvatarError, AvatarFrame, RealtimeAvatarSession

__all__ = ["AvatarError", "AvatarFrame", "RealtimeAvatarSession"]
