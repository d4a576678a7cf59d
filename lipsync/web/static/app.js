// Lip-sync live page: microphone or an audio file in, avatar video with its sound out.
// Protocols: docs/DELIVERY.md. Plain JS, no build step, no external resources.
//
// Two transports (the Transport select, or ?transport=ws|webrtc):
// - WebRTC (the default where the browser has RTCPeerConnection): the microphone (or the
//   file, through WebAudio) goes up as an audio track; the avatar's H.264 video and Opus
//   sound come down as tracks of one stream, played by the <video> element (the browser
//   keeps them in sync from the RTCP sender reports). A data channel `control` carries
//   interrupt / end_of_audio / stop / ping up and each frame's metadata down.
// - WebSocket (the fallback): described below.
//
// WebSocket playout:// the first frame of a session anchors a playout clock (its pts is shown
// `buffer` ms after it arrived); every later frame is shown at anchor + (pts - pts0) and its
// 40 ms of returned audio is scheduled through WebAudio at that same time. The clock is the
// AudioContext's (what is being heard now, from getOutputTimestamp), so picture and sound
// cannot drift apart; without a running AudioContext it falls back to performance.now()
// and plays no sound.
//
// Measures (window.lipsyncStats, also shown in the status panel):
// - fps: frames received in the last second (displayFps: frames shown in the last second);
// - latencyMs: mean over the last second of generated frames of the service's latency_ms
//   (last audio needed -> frame sent) + half the WebSocket ping round trip (rttMs);
// - wsHopMs: gateway send -> page receive of the frames (the same machine's wall clock, so
//   only meaningful when the gateway runs on this machine), median of the last 50;
// - e2eMs: "audio in -> frame out": for each shown generated frame, the time from the
//   capture of its audio (the first sample of its 40 ms) to showing it with its sound; it
//   includes the model's lookahead (~450 ms), processing, transport and the playout buffer.
//   Frame f of clip c carries the clip's audio from f * 40 ms on; the page knows when it
//   captured each clip's first sample (a clip begins with the first audio after the
//   session's start, an end_of_audio or an interrupt) and captures in real time.
//   Not counted: the sound card's input latency before the AudioWorklet sees the samples.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const BUFFER_MS = Math.max(0, Number(params.get('buffer') || 120));
  const CHUNK_MS = 20; // audio sent per message
  const PING_MS = 1000;
  const REANCHOR_S = 0.25; // a frame later than this re-anchors the playout clock

  const stats = {
    state: 'idle', model: null, source: null, clock: null, error: null, transport: null,
    audioBytesReceived: 0, videoFramesDecoded: 0, avOffsetMs: null, videoCodec: null,
    recentGenerated: null, avOffsetMedianMs: null,
    modelsLoaded: false, models: [],
    framesReceived: 0, framesShown: 0, generatedFrames: 0, idleFrames: 0, speechFrames: 0,
    lateFrames: 0, skippedFrames: 0, reanchors: 0, catchUpDrops: 0,
    fps: 0, displayFps: 0, playoutDelayMs: null,
    latencyMs: null, serverLatencyMs: null, rttMs: null, wsHopMs: null, e2eMs: null,
    bufferMs: BUFFER_MS, audioSentMs: 0, audioChunksSent: 0, audioScheduled: 0,
    lastFrameHash: null, lastIndex: -1, distinctFrames: 0, distinctGeneratedFrames: 0,
    frameWidth: 0, frameHeight: 0,
  };
  window.lipsyncStats = stats;

  const canvas = $('video');
  const rtcVideo = $('rtc');
  if (params.get('transport') === 'ws' || !window.RTCPeerConnection) $('transport').value = 'ws';
  const g2d = canvas.getContext('2d');
  let ctx = null; // AudioContext: capture and playback
  let workletReady = null;
  let session = null;
  let source = null; // {kind, stop()}
  const seen = new Set();
  const seenGenerated = new Set();
  const recvTimes = [];
  const shownTimes = [];
  const serverLat = []; // [time, latency_ms] of generated frames
  const e2eSamples = []; // [time, ms]
  const waits = []; // [time, ms from receiving a frame to showing it]
  const hops = [];
  const rtts = [];
  const recentGenerated = []; // WebRTC: generated flags of the last 5 frames sent
  const avOffsets = []; // WebRTC: video - audio estimated playout (sender clock), ms

  // -- helpers ----------------------------------------------------------------------------
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const median = (a) => {
    if (!a.length) return null;
    const s = [...a].sort((x, y) => x - y);
    return s[s.length >> 1];
  };
  const meanRecent = (pairs, now, windowMs) => {
    while (pairs.length && pairs[0][0] < now - windowMs) pairs.shift();
    if (!pairs.length) return null;
    return pairs.reduce((acc, p) => acc + p[1], 0) / pairs.length;
  };
  const countRecent = (times, now) => {
    while (times.length && times[0] < now - 1000) times.shift();
    return times.length;
  };
  function fnv1a(bytes) { // 32-bit FNV-1a, hex
    let h = 0x811c9dc5;
    for (let i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193);
    }
    return (h >>> 0).toString(16).padStart(8, '0');
  }
  const fmt = (v, unit = ' ms') => (v == null || !isFinite(v) ? '–' : `${Math.round(v)}${unit}`);

  function setState(state) {
    stats.state = state;
    const el = $('state');
    el.textContent = state;
    el.className = `badge ${state}`;
    updateButtons();
  }
  function showError(message) {
    stats.error = message;
    $('error').textContent = message || '';
  }
  function updateButtons() {
    const ready = stats.modelsLoaded && $('model').value;
    const live = session && !session.closed;
    $('mic').disabled = !ready || (source && source.kind === 'mic');
    $('file').disabled = !ready;
    $('stop').disabled = !live;
    $('interrupt').disabled = !live;
    stats.source = source ? source.kind : null;
    $('source').textContent = source ? source.kind : '–';
  }

  // -- audio context and playout clock ------------------------------------------------------
  async function ensureAudioContext() {
    if (!ctx) ctx = new AudioContext({ latencyHint: 'interactive' });
    if (ctx.state !== 'running') {
      try { await Promise.race([ctx.resume(), sleep(1000)]); } catch (e) { /* stays suspended */ }
    }
    return ctx;
  }

  function makeClock() {
    if (ctx && ctx.state === 'running') {
      return {
        kind: 'audio',
        sched: () => ctx.currentTime, // where new sound can be scheduled
        now() { // the context time being heard now
          const ts = ctx.getOutputTimestamp ? ctx.getOutputTimestamp() : null;
          if (ts && ts.contextTime > 0 && ts.performanceTime > 0) {
            return ts.contextTime + (performance.now() - ts.performanceTime) / 1000;
          }
          return ctx.currentTime - (ctx.outputLatency || ctx.baseLatency || 0);
        },
      };
    }
    const now = () => performance.now() / 1000;
    return { kind: 'performance', sched: now, now };
  }

  // -- session ----------------------------------------------------------------------------
  function showStage(kind) { // the canvas for WebSocket frames, the <video> for WebRTC
    canvas.hidden = kind === 'webrtc';
    rtcVideo.hidden = kind !== 'webrtc';
    stats.transport = kind;
    $('via').textContent = kind === 'webrtc' ? 'WebRTC' : 'WebSocket';
  }

  function openSession(model) {
    showStage('ws');
    return new Promise((resolve, reject) => {
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const ws = new WebSocket(`${proto}//${location.host}/ws`);
      ws.binaryType = 'arraybuffer';
      const info = stats.models.find((m) => m.model_id === model) || {};
      const s = {
        kind: 'ws', ws, model, closed: false, started: false, ended: false,
        frameMs: 1000 / (info.fps || 25),
        rate: ctx.sampleRate,
        clock: makeClock(),
        anchor: null, queue: [], sources: [], slacks: [],
        clipStarts: [], newClip: true, pingTimer: null,
        out: ctx.createGain(),
      };
      s.out.gain.value = $('sound').checked ? 1 : 0;
      s.out.connect(ctx.destination);
      stats.clock = s.clock.kind;
      stats.model = model;
      session = s;
      showError(null);
      setState('connecting');
      ws.onopen = () => {
        setState('open');
        const start = { type: 'start', model, sample_rate: s.rate, realtime: true };
        if (apiKey) start.api_key = apiKey;
        ws.send(JSON.stringify(start));
      };
      ws.onmessage = (ev) => {
        if (typeof ev.data === 'string') {
          const msg = JSON.parse(ev.data);
          if (msg.type === 'started') {
            s.started = true;
            ping(s);
            s.pingTimer = setInterval(() => ping(s), PING_MS);
            resolve(s);
          } else if (msg.type === 'pong') {
            rtts.push(performance.now() - msg.t);
            if (rtts.length > 10) rtts.shift();
            stats.rttMs = median(rtts);
          } else if (msg.type === 'error') {
            if (msg.code === 'UNAUTHENTICATED' || msg.code === 'PERMISSION_DENIED') forgetKey();
            showError(msg.message);
            setState('error');
          } else if (msg.type === 'end') {
            s.ended = true;
          }
        } else {
          onFrame(s, ev.data);
        }
      };
      ws.onerror = () => { if (!stats.error) showError('WebSocket error'); };
      ws.onclose = (ev) => {
        s.closed = true;
        clearInterval(s.pingTimer);
        if (session === s && source) { source.stop(); source = null; }
        if (stats.state !== 'error') {
          if (!s.ended && ev.code !== 1000 && !s.closing) showError(`connection closed (${ev.code})`);
          setState(!s.ended && ev.code !== 1000 && !s.closing ? 'error' : 'closed');
        }
        if (!s.started) reject(new Error(stats.error || 'connection closed'));
        updateButtons();
      };
    });
  }

  async function ensureSession() {
    const model = $('model').value;
    const kind = $('transport').value;
    if (session && !session.closed && session.model === model && session.kind === kind) {
      return session;
    }
    if (session && !session.closed) closeSession(session);
    return kind === 'webrtc' ? openRtcSession(model) : openSession(model);
  }

  function closeSession(s) {
    s.closing = true;
    if (s.kind === 'webrtc') { closeRtc(s); return; }
    try { s.ws.close(1000); } catch (e) { /* already closed */ }
    dropPlayout(s);
  }

  function send(s, obj) {
    if (s.kind === 'webrtc') {
      if (s.channel && s.channel.readyState === 'open') s.channel.send(JSON.stringify(obj));
    } else if (s.ws.readyState === WebSocket.OPEN) {
      s.ws.send(JSON.stringify(obj));
    }
  }

  // -- WebRTC session -----------------------------------------------------------------------
  // H.264 constrained baseline, packetization-mode 1: what the gateway sends as it comes
  // from the compositing service (no re-encoding).
  function preferH264(transceiver) {
    if (!transceiver.setCodecPreferences || !RTCRtpReceiver.getCapabilities) return;
    const codecs = RTCRtpReceiver.getCapabilities('video').codecs;
    const fmtp = (c) => (c.sdpFmtpLine || '').toLowerCase();
    const h264 = codecs.filter((c) => c.mimeType.toLowerCase() === 'video/h264'
      && fmtp(c).includes('packetization-mode=1') && fmtp(c).includes('profile-level-id=42e01f'));
    const rtx = codecs.filter((c) => c.mimeType.toLowerCase() === 'video/rtx');
    if (h264.length) transceiver.setCodecPreferences([...h264, ...rtx]);
  }

  function iceGathered(pc, timeoutMs) { // the gateway takes no trickled candidates
    if (pc.iceGatheringState === 'complete') return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (pc.iceGatheringState === 'complete') resolve(); };
      pc.addEventListener('icegatheringstatechange', done);
      setTimeout(resolve, timeoutMs);
    });
  }

  async function openRtcSession(model) {
    showStage('webrtc');
    showError(null);
    setState('connecting');
    const cfg = await (await fetch('/api/webrtc')).json();
    const pc = new RTCPeerConnection({ iceServers: cfg.ice_servers || [] });
    const dest = ctx.createMediaStreamDestination(); // what goes up: mic or file, else silence
    const s = {
      kind: 'webrtc', pc, model, dest, channel: null, closed: false, started: false,
      ended: false, closing: false, pingTimer: null, statsTimer: null, stopTimer: null,
      out: { gain: { value: 1 } },
    };
    session = s;
    stats.model = model;
    stats.clock = 'browser (RTCP sync)';
    pc.addTransceiver(dest.stream.getAudioTracks()[0], { direction: 'sendrecv' });
    preferH264(pc.addTransceiver('video', { direction: 'recvonly' }));
    const ch = s.channel = pc.createDataChannel('control');
    ch.onopen = () => {
      ping(s);
      s.pingTimer = setInterval(() => ping(s), PING_MS);
    };
    ch.onmessage = (ev) => onRtcMessage(s, JSON.parse(ev.data));
    const remote = new MediaStream();
    pc.ontrack = (ev) => {
      remote.addTrack(ev.track);
      rtcVideo.srcObject = remote;
      rtcVideo.muted = !$('sound').checked;
      rtcVideo.play().catch(() => { /* autoplay refused: plays on the next gesture */ });
    };
    pc.onconnectionstatechange = () => {
      const st = pc.connectionState;
      if (st === 'connected' && stats.state === 'open') setState('streaming');
      if ((st === 'failed' || st === 'closed') && !s.closed) {
        if (!s.ended && !s.closing) { showError(`WebRTC connection ${st}`); setState('error'); }
        closeRtc(s);
      }
    };
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceGathered(pc, 3000);
      const body = { sdp: pc.localDescription.sdp, type: 'offer', model_id: model };
      if (apiKey) body.key = apiKey;
      const resp = await fetch('/webrtc/offer', {
        method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
      });
      const answer = await resp.json();
      if (!resp.ok) {
        if (resp.status === 401 || resp.status === 403) forgetKey();
        throw new Error(answer.error || resp.statusText);
      }
      await pc.setRemoteDescription(answer);
    } catch (e) {
      showError(`WebRTC: ${e.message || e}`);
      setState('error');
      closeRtc(s);
      throw e;
    }
    s.started = true;
    setState(pc.connectionState === 'connected' ? 'streaming' : 'open');
    s.statsTimer = setInterval(() => rtcStats(s), 1000);
    return s;
  }

  function closeRtc(s) {
    if (s.closed) return;
    s.closed = true;
    clearInterval(s.pingTimer);
    clearInterval(s.statsTimer);
    clearTimeout(s.stopTimer);
    try { s.pc.close(); } catch (e) { /* closed */ }
    if (session === s && source) { source.stop(); source = null; }
    if (stats.state !== 'error') setState('closed');
    updateButtons();
  }

  function onRtcMessage(s, msg) {
    if (msg.type === 'frame') {
      const now = performance.now();
      stats.framesReceived++;
      recvTimes.push(now);
      if (msg.generated) { stats.generatedFrames++; serverLat.push([now, msg.latency_ms]); } else stats.idleFrames++;
      if (msg.speech) stats.speechFrames++;
      stats.lastIndex = msg.index;
      recentGenerated.push(msg.generated ? 1 : 0);
      if (recentGenerated.length > 5) recentGenerated.shift();
      stats.recentGenerated = recentGenerated.length === 5
        ? recentGenerated.reduce((a, b) => a + b, 0) : null;
    } else if (msg.type === 'pong') {
      rtts.push(performance.now() - msg.t);
      if (rtts.length > 10) rtts.shift();
      stats.rttMs = median(rtts);
    } else if (msg.type === 'end') {
      s.ended = true;
      closeRtc(s);
    } else if (msg.type === 'error') {
      showError(msg.message);
      setState('error');
    }
  }

  async function rtcStats(s) { // what the browser received, and its audio/video offset
    if (s.closed) return;
    let audio = null;
    let video = null;
    const report = await s.pc.getStats();
    report.forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') audio = r;
      if (r.type === 'inbound-rtp' && r.kind === 'video') video = r;
    });
    if (audio) stats.audioBytesReceived = audio.bytesReceived || 0;
    if (video) {
      stats.videoFramesDecoded = video.framesDecoded || 0;
      const codec = video.codecId && report.get(video.codecId);
      if (codec) stats.videoCodec = `${codec.mimeType} ${codec.sdpFmtpLine || ''}`.trim();
    }
    // Each track's estimatedPlayoutTimestamp is the sender's clock (NTP, from its sender
    // reports) of what plays now: their difference is the offset the viewer sees.
    if (audio && video && audio.estimatedPlayoutTimestamp && video.estimatedPlayoutTimestamp) {
      stats.avOffsetMs = video.estimatedPlayoutTimestamp - audio.estimatedPlayoutTimestamp;
      avOffsets.push(stats.avOffsetMs);
      if (avOffsets.length > 30) avOffsets.shift();
      stats.avOffsetMedianMs = median(avOffsets);
    }
  }

  function onRtcVideoFrame(now, meta) {
    if (session && session.kind === 'webrtc' && !session.closed) {
      stats.framesShown++;
      shownTimes.push(now);
      stats.frameWidth = meta.width;
      stats.frameHeight = meta.height;
    }
    rtcVideo.requestVideoFrameCallback(onRtcVideoFrame);
  }
  if (rtcVideo.requestVideoFrameCallback) rtcVideo.requestVideoFrameCallback(onRtcVideoFrame);
  function ping(s) { send(s, { type: 'ping', t: performance.now() }); }

  // pcm: Float32Array at s.rate; captureMs: performance.now() when its first sample was captured
  function sendAudio(s, pcm, captureMs) {
    if (s.ws.readyState !== WebSocket.OPEN || !pcm.length) return;
    if (s.newClip) { // the server starts a new clip with this audio
      s.clipStarts.push(captureMs);
      s.newClip = false;
    }
    s.ws.send(pcm.byteOffset === 0 && pcm.byteLength === pcm.buffer.byteLength ? pcm.buffer : pcm.slice().buffer);
    stats.audioSentMs += (pcm.length / s.rate) * 1000;
    stats.audioChunksSent++;
  }
  function endOfAudio(s) {
    send(s, { type: 'end_of_audio' });
    s.newClip = true;
  }

  // -- frames -----------------------------------------------------------------------------
  function onFrame(s, buf) {
    const recvPerf = performance.now();
    const dv = new DataView(buf);
    const hlen = dv.getUint32(0, true);
    const h = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, hlen)));
    const aOff = 4 + hlen;
    const pcm = new Int16Array(buf.slice(aOff, aOff + h.audio_len));
    const jpeg = new Uint8Array(buf, aOff + h.audio_len, h.jpeg_len);
    if (stats.state === 'open') setState('streaming');

    stats.framesReceived++;
    if (h.generated) stats.generatedFrames++; else stats.idleFrames++;
    if (h.speech) stats.speechFrames++;
    recvTimes.push(recvPerf);
    hops.push(performance.timeOrigin + recvPerf - h.sent_ms);
    if (hops.length > 50) hops.shift();
    stats.wsHopMs = median(hops);
    const hash = fnv1a(jpeg);
    if (seen.size < 100000) seen.add(hash);
    stats.distinctFrames = seen.size;
    if (h.generated) {
      serverLat.push([recvPerf, h.latency_ms]);
      if (seenGenerated.size < 100000) seenGenerated.add(hash);
      stats.distinctGeneratedFrames = seenGenerated.size;
    }

    // playout time of this frame on the session clock
    const now = s.clock.sched();
    const frameS = s.frameMs / 1000;
    if (!s.anchor) s.anchor = { t0: now + BUFFER_MS / 1000, p0: h.pts_ms };
    let T = s.anchor.t0 + (h.pts_ms - s.anchor.p0) / 1000;
    if (T < now) {
      stats.lateFrames++;
      if (now - T > REANCHOR_S) { // the stream stalled: start again with a full buffer
        s.anchor = { t0: now + BUFFER_MS / 1000, p0: h.pts_ms };
        T = s.anchor.t0;
        stats.reanchors++;
        s.slacks.length = 0;
      }
    }
    // Catch up: when every frame of the last second arrived more than one frame earlier
    // than the buffer needs (after a stall the service sends its backlog in a burst), drop
    // a quiet frame and move the clock one frame earlier, until the buffer is back to size.
    s.slacks.push([recvPerf, T - now]);
    while (s.slacks.length && s.slacks[0][0] < recvPerf - 1000) s.slacks.shift();
    if (s.slacks.length >= 10 && quiet(h, pcm)) {
      let minSlack = Infinity;
      for (const x of s.slacks) minSlack = Math.min(minSlack, x[1]);
      if (minSlack - BUFFER_MS / 1000 > frameS) {
        s.anchor.t0 -= frameS;
        for (const x of s.slacks) x[1] -= frameS;
        stats.catchUpDrops++;
        return;
      }
    }
    scheduleAudio(s, pcm, h.audio_rate || 16000, T);
    createImageBitmap(new Blob([jpeg], { type: 'image/jpeg' })).then((bmp) => {
      if (s.closing && session !== s) { bmp.close(); return; }
      const item = { T, bmp, h, hash, recvPerf };
      let i = s.queue.length;
      while (i > 0 && s.queue[i - 1].T > T) i--;
      s.queue.splice(i, 0, item);
    }, () => { /* undecodable frame: skip */ });
  }

  function quiet(h, pcm) { // a frame whose sound nobody misses: no speech, or below -40 dBFS
    if (!h.speech) return true;
    let e = 0;
    for (let i = 0; i < pcm.length; i++) e += pcm[i] * pcm[i];
    return pcm.length > 0 && Math.sqrt(e / pcm.length) < 328;
  }

  function scheduleAudio(s, pcm, rate, T) {
    if (s.clock.kind !== 'audio' || !pcm.length) return;
    let silent = true;
    for (let i = 0; i < pcm.length; i++) if (pcm[i] !== 0) { silent = false; break; }
    if (silent) return;
    const buffer = ctx.createBuffer(1, pcm.length, rate);
    const ch = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
    const src = ctx.createBufferSource();
    src.buffer = buffer;
    src.connect(s.out);
    const now = ctx.currentTime;
    if (T >= now) src.start(T);
    else if (now - T < buffer.duration) src.start(now, now - T);
    else return;
    stats.audioScheduled++;
    s.sources.push(src);
    src.onended = () => { const k = s.sources.indexOf(src); if (k >= 0) s.sources.splice(k, 1); };
  }

  function dropPlayout(s) { // forget frames and sound not yet played (interrupt, close)
    for (const f of s.queue) f.bmp.close();
    s.queue.length = 0;
    for (const src of s.sources) { try { src.stop(); } catch (e) { /* not started */ } }
    s.sources.length = 0;
  }

  function render() {
    const s = session;
    if (!s || !s.queue || !s.queue.length) return;
    const now = s.clock.now();
    let f = null;
    while (s.queue.length && s.queue[0].T <= now) {
      if (f) { f.bmp.close(); stats.skippedFrames++; }
      f = s.queue.shift();
    }
    if (!f) return;
    if (canvas.width !== f.bmp.width || canvas.height !== f.bmp.height) {
      canvas.width = f.bmp.width;
      canvas.height = f.bmp.height;
    }
    g2d.drawImage(f.bmp, 0, 0);
    f.bmp.close();
    const shownAt = performance.now();
    stats.framesShown++;
    stats.frameWidth = canvas.width;
    stats.frameHeight = canvas.height;
    stats.lastFrameHash = f.hash;
    stats.lastIndex = f.h.index;
    shownTimes.push(shownAt);
    waits.push([shownAt, shownAt - f.recvPerf]);
    const c = f.h.clip;
    if (f.h.generated && c >= 0 && c < s.clipStarts.length) {
      e2eSamples.push([shownAt, shownAt - (s.clipStarts[c] + f.h.clip_frame * s.frameMs)]);
    }
  }
  function loop() { render(); requestAnimationFrame(loop); }
  requestAnimationFrame(loop);
  setInterval(render, 10); // keeps time when animation frames are throttled

  // -- status panel -----------------------------------------------------------------------
  function updateStats() {
    const now = performance.now();
    stats.fps = countRecent(recvTimes, now);
    stats.displayFps = countRecent(shownTimes, now);
    const lat = meanRecent(serverLat, now, 1000);
    if (lat != null) {
      stats.serverLatencyMs = lat;
      stats.latencyMs = lat + (stats.rttMs != null ? stats.rttMs / 2 : 0);
    }
    const wait = meanRecent(waits, now, 1000);
    if (wait != null) stats.playoutDelayMs = wait;
    const e2e = meanRecent(e2eSamples, now, 1000);
    if (e2e != null) stats.e2eMs = e2e;
    $('fps').textContent = `${stats.fps} in · ${stats.displayFps} shown`;
    $('latency').textContent = fmt(stats.latencyMs);
    const hop = stats.wsHopMs == null ? '–' : `${stats.wsHopMs.toFixed(1)} ms`;
    const rtt = stats.rttMs == null ? '–' : `${stats.rttMs.toFixed(1)} ms`;
    $('parts').textContent = `${fmt(stats.serverLatencyMs)} · ${hop} · ${rtt}`;
    $('e2e').textContent = fmt(stats.e2eMs);
    $('counts').textContent = `${stats.framesReceived} (${stats.generatedFrames} / ${stats.idleFrames})`;
    $('speech').textContent = String(stats.speechFrames);
    $('late').textContent = `${stats.lateFrames} / ${stats.skippedFrames + stats.catchUpDrops}`;
    $('clock').textContent = stats.clock ? `${stats.clock} clock, ${BUFFER_MS} ms buffer` : '–';
  }
  setInterval(updateStats, 250);

  // -- sources ----------------------------------------------------------------------------
  const WORKLET = `
class LipsyncCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.n = options.processorOptions.chunk;
    this.buf = new Float32Array(this.n);
    this.len = 0;
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      let i = 0;
      while (i < ch.length) {
        const k = Math.min(ch.length - i, this.n - this.len);
        this.buf.set(ch.subarray(i, i + k), this.len);
        this.len += k;
        i += k;
        if (this.len === this.n) {
          this.port.postMessage(this.buf, [this.buf.buffer]);
          this.buf = new Float32Array(this.n);
          this.len = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor('lipsync-capture', LipsyncCapture);
`;

  function stopSource() {
    if (source) { source.stop(); source = null; }
    updateButtons();
  }

  async function startMic() {
    try {
      stopSource();
      await ensureAudioContext();
      const stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false },
      });
      if ($('transport').value === 'webrtc') {
        const s = await ensureSession();
        const input = ctx.createMediaStreamSource(stream);
        input.connect(s.dest);
        source = {
          kind: 'mic',
          stop() { input.disconnect(); stream.getTracks().forEach((t) => t.stop()); },
        };
        updateButtons();
        return;
      }
      if (!workletReady) {
        const url = URL.createObjectURL(new Blob([WORKLET], { type: 'application/javascript' }));
        workletReady = ctx.audioWorklet.addModule(url);
      }
      await workletReady;
      const s = await ensureSession();
      const input = ctx.createMediaStreamSource(stream);
      const node = new AudioWorkletNode(ctx, 'lipsync-capture', {
        numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1],
        processorOptions: { chunk: Math.round((ctx.sampleRate * CHUNK_MS) / 1000) },
      });
      const sink = ctx.createGain(); // keeps the worklet pulled, silently
      sink.gain.value = 0;
      input.connect(node);
      node.connect(sink);
      sink.connect(ctx.destination);
      node.port.onmessage = (ev) => {
        const pcm = ev.data;
        sendAudio(s, pcm, performance.now() - (pcm.length / ctx.sampleRate) * 1000);
      };
      source = {
        kind: 'mic',
        stop() {
          node.port.onmessage = null;
          input.disconnect();
          node.disconnect();
          sink.disconnect();
          stream.getTracks().forEach((t) => t.stop());
        },
      };
      updateButtons();
    } catch (e) {
      showError(`microphone: ${e.message || e}`);
      if (!session || session.closed) setState('error');
    }
  }

  async function playFile(file) {
    try {
      stopSource();
      await ensureAudioContext();
      const decoded = await ctx.decodeAudioData(await file.arrayBuffer());
      const pcm = new Float32Array(decoded.length);
      for (let c = 0; c < decoded.numberOfChannels; c++) {
        const ch = decoded.getChannelData(c);
        for (let i = 0; i < pcm.length; i++) pcm[i] += ch[i] / decoded.numberOfChannels;
      }
      const s = await ensureSession();
      if (s.kind === 'webrtc') { // played into the session's audio track, in real time
        const node = ctx.createBufferSource();
        node.buffer = decoded;
        node.connect(s.dest);
        const me = {
          kind: `file (${file.name})`,
          stop() { node.onended = null; try { node.stop(); } catch (e) { /* done */ } node.disconnect(); },
        };
        node.onended = () => {
          node.disconnect();
          endOfAudio(s);
          if (source === me) { source = null; updateButtons(); }
        };
        node.start();
        source = me;
        updateButtons();
        return;
      }
      const rate = decoded.sampleRate;
      if (rate !== s.rate) throw new Error(`decoded at ${rate} Hz, session expects ${s.rate} Hz`);
      const chunk = Math.round((rate * CHUNK_MS) / 1000);
      const t0 = performance.now();
      let sent = 0;
      let timer = null;
      const me = { kind: `file (${file.name})`, stop() { clearInterval(timer); } };
      timer = setInterval(() => { // stream in real time
        const due = Math.min(pcm.length, Math.floor(((performance.now() - t0) / 1000) * rate));
        while (due - sent >= chunk || (due === pcm.length && sent < due)) {
          const n = Math.min(chunk, due - sent);
          sendAudio(s, pcm.slice(sent, sent + n), t0 + (sent / rate) * 1000);
          sent += n;
        }
        if (sent >= pcm.length) {
          clearInterval(timer);
          endOfAudio(s);
          if (source === me) { source = null; updateButtons(); }
        }
      }, CHUNK_MS / 2);
      source = me;
      updateButtons();
    } catch (e) {
      showError(`file: ${e.message || e}`);
    }
  }

  function stop() { // finish: the queued speech plays out, then the session ends
    const s = session;
    stopSource();
    if (!s || s.closed) return;
    if (s.kind === 'webrtc') { // the gateway flushes the clip, then sends `end`
      send(s, { type: 'stop' });
      s.closing = true;
      s.stopTimer = setTimeout(() => closeRtc(s), 15000);
      return;
    }
    send(s, { type: 'end_of_audio' });
    send(s, { type: 'stop' });
    s.newClip = true;
  }

  function interrupt() { // barge in: the avatar stops talking now, the session goes on idling
    const s = session;
    stopSource();
    if (!s || s.closed) return;
    send(s, { type: 'interrupt' });
    s.newClip = true;
    if (s.kind === 'ws') dropPlayout(s);
  }

  // -- wiring -----------------------------------------------------------------------------
  // The compositing service may require an API key (docs/SECURITY.md): asked for when
  // /api/models answers 401/403, kept for this tab only, sent as a bearer token there and
  // in the WebSocket's start message.
  let apiKey = sessionStorage.getItem('lipsync.apiKey') || '';
  function forgetKey() { apiKey = ''; sessionStorage.removeItem('lipsync.apiKey'); }
  async function fetchModels() {
    for (let attempt = 0; ; attempt++) {
      const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
      const resp = await fetch('/api/models', { headers });
      if ((resp.status !== 401 && resp.status !== 403) || attempt >= 3) return resp;
      forgetKey();
      const key = window.prompt(resp.status === 401
        ? 'This service needs an API key:' : 'That key may not do this; another API key:');
      if (!key) return resp;
      apiKey = key.trim();
      sessionStorage.setItem('lipsync.apiKey', apiKey);
    }
  }

  async function loadModels() {
    try {
      const resp = await fetchModels();
      const body = await resp.json();
      if (!resp.ok) throw new Error(body.error || resp.statusText);
      stats.models = body;
      const sel = $('model');
      sel.innerHTML = '';
      for (const m of body) {
        const o = document.createElement('option');
        o.value = m.model_id;
        o.textContent = m.frame_width ? `${m.model_id} (${m.frame_width}×${m.frame_height})` : m.model_id;
        sel.appendChild(o);
      }
      if (!body.length) sel.innerHTML = '<option value="">no avatars</option>';
      const want = params.get('model');
      if (want && body.some((m) => m.model_id === want)) sel.value = want;
      stats.modelsLoaded = true;
    } catch (e) {
      showError(`avatars: ${e.message || e}`);
    }
    updateButtons();
  }

  $('mic').addEventListener('click', startMic);
  $('file').addEventListener('change', (ev) => { const f = ev.target.files[0]; if (f) playFile(f); ev.target.value = ''; });
  $('stop').addEventListener('click', stop);
  $('interrupt').addEventListener('click', interrupt);
  $('model').addEventListener('change', () => {
    stopSource();
    if (session && !session.closed) closeSession(session);
    updateButtons();
  });
  $('sound').addEventListener('change', () => {
    if (session) session.out.gain.value = $('sound').checked ? 1 : 0;
    rtcVideo.muted = !$('sound').checked;
  });
  $('transport').addEventListener('change', () => {
    stopSource();
    if (session && !session.closed) closeSession(session);
    showStage($('transport').value);
    updateButtons();
  });
  showStage($('transport').value);

  g2d.fillStyle = '#222';
  g2d.fillRect(0, 0, canvas.width, canvas.height);
  g2d.fillStyle = '#999';
  g2d.font = '20px system-ui, sans-serif';
  g2d.textAlign = 'center';
  g2d.fillText('choose an avatar, then Microphone or Play a file', canvas.width / 2, canvas.height / 2);

  loadModels().then(() => {
    if (params.get('autostart') === 'mic') startMic();
  });
  window.lipsync = { startMic, playFile, stop, interrupt };
})();
