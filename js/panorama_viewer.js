// 360° viewer for Atelier's panorama work: when a SaveImage or PreviewImage node shows an equirectangular image
// (width twice the height), a look-around view appears under it; drag to turn, the wheel zooms. The view is a
// gnomonic projection with the same conventions as nodes/panorama/projection.py (longitude grows to the right,
// the top row is north). Uses only app.registerExtension and the api object.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const VIEWER_NODES = new Set(["SaveImage", "PreviewImage"]);
const VIEW_WIDTH = 320;
const VIEW_HEIGHT = 200;
const DEGREES_PER_PIXEL = 0.3;
const MIN_FOV = 30;
const MAX_FOV = 120;

function render(viewer) {
  const { source, view, yaw, pitch, fov } = viewer;
  if (!source) return;
  const ctx = view.getContext("2d");
  const out = ctx.createImageData(VIEW_WIDTH, VIEW_HEIGHT);
  const half = Math.tan((fov * Math.PI) / 360);
  const cy = Math.cos(yaw), sy = Math.sin(yaw), cp = Math.cos(pitch), sp = Math.sin(pitch);
  const { width, height, data } = source;
  for (let r = 0; r < VIEW_HEIGHT; r++) {
    const y = (1 - ((r + 0.5) / VIEW_HEIGHT) * 2) * half * (VIEW_HEIGHT / VIEW_WIDTH);
    for (let c = 0; c < VIEW_WIDTH; c++) {
      const x = (((c + 0.5) / VIEW_WIDTH) * 2 - 1) * half;
      // ray (x east, y north, 1 forward), pitched then yawed into world (x at lon 90°, y north, z at lon 0°)
      const fy = y * cp + sp, fz = -y * sp + cp;
      const wx = x * cy + fz * sy, wz = -x * sy + fz * cy;
      const lon = Math.atan2(wx, wz), lat = Math.atan2(fy, Math.hypot(wx, wz));
      const j = Math.min(width - 1, Math.floor(((lon + Math.PI) / (2 * Math.PI)) * width));
      const i = Math.min(height - 1, Math.max(0, Math.floor(((Math.PI / 2 - lat) / Math.PI) * height)));
      const from = (i * width + j) * 4, to = (r * VIEW_WIDTH + c) * 4;
      out.data[to] = data[from]; out.data[to + 1] = data[from + 1]; out.data[to + 2] = data[from + 2];
      out.data[to + 3] = 255;
    }
  }
  ctx.putImageData(out, 0, 0);
}

function attachViewer(node) {
  if (node.atelierPanorama) return node.atelierPanorama;
  const view = document.createElement("canvas");
  view.width = VIEW_WIDTH;
  view.height = VIEW_HEIGHT;
  view.style.cursor = "grab";
  view.title = "360° view: drag to look around, wheel to zoom";
  const viewer = { view, source: null, yaw: 0, pitch: 0, fov: 90 };
  let last = null;
  view.addEventListener("pointerdown", (event) => { last = [event.clientX, event.clientY]; view.setPointerCapture(event.pointerId); });
  view.addEventListener("pointerup", () => { last = null; });
  view.addEventListener("pointermove", (event) => {
    if (!last) return;
    viewer.yaw -= ((event.clientX - last[0]) * DEGREES_PER_PIXEL * Math.PI) / 180;
    viewer.pitch = Math.max(-Math.PI / 2, Math.min(Math.PI / 2,
      viewer.pitch + ((event.clientY - last[1]) * DEGREES_PER_PIXEL * Math.PI) / 180));
    last = [event.clientX, event.clientY];
    render(viewer);
  });
  view.addEventListener("wheel", (event) => {
    event.preventDefault();
    viewer.fov = Math.max(MIN_FOV, Math.min(MAX_FOV, viewer.fov + Math.sign(event.deltaY) * 5));
    render(viewer);
  });
  node.addDOMWidget?.("panorama_view", "atelier_panorama", view, { serialize: false });
  node.atelierPanorama = viewer;
  return viewer;
}

function showPanorama(node, image) {
  const params = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? "",
                                       type: image.type ?? "output" });
  const picture = new Image();
  picture.crossOrigin = "anonymous";
  picture.onload = () => {
    if (picture.naturalWidth !== 2 * picture.naturalHeight) return;  // not an equirectangular panorama
    const canvas = document.createElement("canvas");
    canvas.width = picture.naturalWidth;
    canvas.height = picture.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(picture, 0, 0);
    const viewer = attachViewer(node);
    viewer.source = ctx.getImageData(0, 0, canvas.width, canvas.height);
    render(viewer);
    node.setDirtyCanvas?.(true, true);
  };
  picture.src = api.apiURL(`/view?${params}`);
}

app.registerExtension({
  name: "atelier.panorama_viewer",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!VIEWER_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const first = message?.images?.[0];
      if (first) showPanorama(this, first);
      return result;
    };
  },
});
