// Omega display client: login, WebRTC receive, input capture, live stats.
// Plain browser JavaScript, no build step. State for tests and benchmarks is
// exposed on window.omega.
"use strict";

const $ = (id) => document.getElementById(id);
const omega = {
  state: "signed out", role: null, pc: null, input: null, pointer: null,
  stats: { framesDecoded: 0, fps: 0, kbps: 0, rttMs: null, latencyMs: null },
  latencies: [], presentedLatencies: [], messages: [],
  send(message) { return sendOn(message.t === "move" ? omega.pointer : omega.input, message); },
};
window.omega = omega;

const MARK_CELL = 16, MARK_CELLS = 34;  // must match hypervisor/remote_display/watermark.py

function setState(state) {
  omega.state = state;
  const el = $("state");
  el.textContent = state;
  el.className = "state " + state;
}

function sendOn(channel, message) {
  if (!channel || channel.readyState !== "open") return false;
  channel.send(JSON.stringify(message));
  return true;
}

async function login(credentials) {
  const response = await fetch("/api/login", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(credentials), credentials: "same-origin",
  });
  if (!response.ok) throw new Error(response.status === 401 ? "wrong token or password"
                                                            : `login failed (${response.status})`);
  return response.json();
}

function iceGatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function connect() {
  setState("connecting");
  const pc = new RTCPeerConnection();
  omega.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  omega.input = pc.createDataChannel("input", { ordered: true });
  omega.pointer = pc.createDataChannel("pointer", { ordered: false, maxRetransmits: 0 });
  for (const channel of [omega.input, omega.pointer]) {
    channel.onmessage = (event) => {
      const message = JSON.parse(event.data);
      omega.messages.push(message);
      if (message.t === "refused" || message.t === "error") {
        $("input-note").textContent = message.reason || message.message;
      }
    };
  }
  pc.ontrack = (event) => {
    // Render frames as soon as they decode: a remote desktop wants latency, not smoothness.
    if ("jitterBufferTarget" in event.receiver) event.receiver.jitterBufferTarget = 0;
    if ("playoutDelayHint" in event.receiver) event.receiver.playoutDelayHint = 0;
    const video = $("video");
    video.srcObject = new MediaStream([event.track]);
    video.play().catch(() => {});
    watchFrames(video);
  };
  pc.onconnectionstatechange = () => setState(pc.connectionState);
  await pc.setLocalDescription(await pc.createOffer());
  await iceGatheringDone(pc, 3000);
  const response = await fetch("/api/offer", {
    method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
    body: JSON.stringify({ type: "offer", sdp: pc.localDescription.sdp }),
  });
  if (!response.ok) { setState("failed"); throw new Error(await response.text()); }
  await pc.setRemoteDescription(await response.json());
}

// ---------------------------------------------------------------- watermark

function readWatermark(video, ctx) {
  if (video.videoWidth < MARK_CELL * MARK_CELLS || video.videoHeight < MARK_CELL) return null;
  ctx.drawImage(video, 0, 0, MARK_CELL * MARK_CELLS, MARK_CELL,
                0, 0, MARK_CELL * MARK_CELLS, MARK_CELL);
  const row = ctx.getImageData(0, MARK_CELL / 2, MARK_CELL * MARK_CELLS, 1).data;
  const bits = [];
  for (let i = 0; i < MARK_CELLS; i++) {
    const p = (i * MARK_CELL + MARK_CELL / 2) * 4;
    bits.push((row[p] + row[p + 1] + row[p + 2]) / 3 > 127 ? 1 : 0);
  }
  if (bits[0] !== 1 || bits[MARK_CELLS - 1] !== 0) return null;
  let value = 0;
  for (let i = 1; i < MARK_CELLS - 1; i++) value = value * 2 + bits[i];
  return value;
}

function watchFrames(video) {
  if (!video.requestVideoFrameCallback) return;
  const ctx = $("mark").getContext("2d", { willReadFrequently: true });
  let last = null;
  const since = (stamp, epochMs) => ((Math.floor(epochMs) % 2 ** 32) - stamp + 2 ** 32) % 2 ** 32;
  const keep = (list, value) => { list.push(value); if (list.length > 20000) list.shift(); };
  const onFrame = (_now, metadata) => {
    const presented = Date.now();
    const stamp = readWatermark(video, ctx);
    if (stamp !== null && stamp !== last) {
      last = stamp;
      // Decoded = when the frame's last packet arrived + the decoder's time on it
      // (WebRTC frame metadata); presented = this callback, at composition.
      const decoded = metadata.receiveTime !== undefined && metadata.processingDuration !== undefined
        ? performance.timeOrigin + metadata.receiveTime + metadata.processingDuration * 1000 : null;
      const toPresented = since(stamp, presented);
      if (toPresented < 10000) {
        keep(omega.presentedLatencies, toPresented);
        const toDecoded = decoded !== null ? since(stamp, decoded) : toPresented;
        keep(omega.latencies, toDecoded);
        omega.stats.latencyMs = toDecoded;
      }
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// -------------------------------------------------------------------- stats

let previous = null;
async function pollStats() {
  if (!omega.pc) return;
  const report = await omega.pc.getStats();
  let inbound = null, pair = null;
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") inbound = s;
    if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s;
  });
  if (inbound) {
    const now = performance.now();
    if (previous) {
      const dt = (now - previous.t) / 1000;
      omega.stats.fps = (inbound.framesDecoded - previous.frames) / dt;
      omega.stats.kbps = (inbound.bytesReceived - previous.bytes) * 8 / 1000 / dt;
    }
    previous = { t: now, frames: inbound.framesDecoded || 0, bytes: inbound.bytesReceived || 0 };
    omega.stats.framesDecoded = inbound.framesDecoded || 0;
    omega.stats.bytesReceived = inbound.bytesReceived || 0;
  }
  if (pair && pair.currentRoundTripTime !== undefined) omega.stats.rttMs = pair.currentRoundTripTime * 1000;
  const s = omega.stats;
  const latency = s.latencyMs !== null ? `latency ${s.latencyMs.toFixed(0)} ms`
                : s.rttMs !== null ? `rtt ${s.rttMs.toFixed(0)} ms` : "";
  $("stats").textContent = `${s.fps.toFixed(1)} fps  ${(s.kbps / 1000).toFixed(2)} Mbps  ${latency}`;
}
setInterval(() => { pollStats().catch(() => {}); }, 1000);

// -------------------------------------------------------------------- input

function pictureFraction(event) {
  const video = $("video");
  const rect = video.getBoundingClientRect();
  const vw = video.videoWidth || rect.width, vh = video.videoHeight || rect.height;
  const scale = Math.min(rect.width / vw, rect.height / vh);
  const w = vw * scale, h = vh * scale;
  const x = (event.clientX - rect.left - (rect.width - w) / 2) / w;
  const y = (event.clientY - rect.top - (rect.height - h) / 2) / h;
  return { x: Math.min(1, Math.max(0, x)), y: Math.min(1, Math.max(0, y)) };
}

function captureInput() {
  const screen = $("screen");
  const typedCodes = new Set();
  let pendingMove = null;
  screen.addEventListener("keydown", (e) => {
    e.preventDefault();
    if (e.key.length === 1 && !e.ctrlKey && !e.altKey && !e.metaKey) {
      typedCodes.add(e.code);
      omega.send({ t: "char", text: e.key });
    } else {
      omega.send({ t: "key", code: e.code, down: true });
    }
  });
  screen.addEventListener("keyup", (e) => {
    e.preventDefault();
    if (typedCodes.delete(e.code)) return;
    omega.send({ t: "key", code: e.code, down: false });
  });
  screen.addEventListener("pointermove", (e) => {
    const first = pendingMove === null;
    pendingMove = pictureFraction(e);
    if (first) requestAnimationFrame(() => {
      omega.send({ t: "move", ...pendingMove });
      pendingMove = null;
    });
  });
  screen.addEventListener("pointerdown", (e) => {
    screen.focus();
    omega.send({ t: "button", button: e.button, down: true, ...pictureFraction(e) });
  });
  screen.addEventListener("pointerup", (e) => {
    omega.send({ t: "button", button: e.button, down: false, ...pictureFraction(e) });
  });
  screen.addEventListener("contextmenu", (e) => e.preventDefault());
  screen.addEventListener("wheel", (e) => {
    e.preventDefault();
    const steps = Math.sign(e.deltaY) * Math.min(5, Math.ceil(Math.abs(e.deltaY) / 100));
    if (steps) omega.send({ t: "wheel", dy: steps });
  }, { passive: false });
  screen.addEventListener("paste", (e) => {
    e.preventDefault();
    omega.send({ t: "text", text: e.clipboardData.getData("text") });
  });
  $("send-text").addEventListener("click", () => {
    omega.send({ t: "text", text: $("paste").value });
    screen.focus();
  });
}

// -------------------------------------------------------------------- start

async function start(credentials) {
  $("login-error").textContent = "";
  try {
    const answer = await login(credentials);
    omega.role = answer.role;
    $("role").textContent = answer.role === "viewer" ? "viewer (watch only)" : "operator";
    $("title").textContent = answer.title;
    $("login").hidden = true;
    $("screen-area").hidden = false;
    if (answer.role === "operator") captureInput();
    else $("clipboard").hidden = true;
    await connect();
  } catch (error) {
    $("login-error").textContent = error.message;
    setState("signed out");
  }
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value, password = $("password").value;
  start(token ? { token } : { password });
});

const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  const token = fragment.get("token");
  history.replaceState(null, "", location.pathname);  // keep the token out of history
  start({ token });
}
