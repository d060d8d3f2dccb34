// Tile map for Atelier's highres nodes: while a tiled node runs, it draws a grid under the node with one cell per
// unit of progress (a tile of the tiled VAE decode, a step of the sampler), filled as they finish, so the artist
// sees the big image fill in beside the per-tile previews. Uses only app.registerExtension and the api object.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TILED_NODES = new Set(["AtelierTiled16KGenerator", "AtelierTiledSample"]);
const MAP_HEIGHT = 60;
const DONE_COLOR = "#4caf50";
const TODO_COLOR = "#333";

function drawMap(node, ctx) {
  const map = node.atelierTileMap;
  if (!map || !map.max) return;
  const columns = Math.max(1, Math.ceil(Math.sqrt(map.max * (node.size[0] / MAP_HEIGHT))));
  const rows = Math.ceil(map.max / columns);
  const width = node.size[0] - 20;
  const cell = Math.min(width / columns, MAP_HEIGHT / rows);
  const top = node.size[1] + 6;
  for (let i = 0; i < map.max; i++) {
    ctx.fillStyle = i < map.value ? DONE_COLOR : TODO_COLOR;
    ctx.fillRect(10 + (i % columns) * cell, top + Math.floor(i / columns) * cell, Math.max(1, cell - 1),
                 Math.max(1, cell - 1));
  }
}

app.registerExtension({
  name: "atelier.tile_map",
  async setup() {
    api.addEventListener("progress", ({ detail }) => {
      const node = app.graph?.getNodeById?.(Number(detail?.node));
      if (!node || !TILED_NODES.has(node.comfyClass ?? node.type)) return;
      node.atelierTileMap = { value: detail.value, max: detail.max };
      node.setDirtyCanvas?.(true, false);
    });
    api.addEventListener("executing", ({ detail }) => {
      const running = detail !== null && typeof detail === "object" ? detail.node : detail;
      if (running !== null && running !== undefined) return;  // null: the prompt finished, clear every map
      for (const node of app.graph?._nodes ?? []) delete node.atelierTileMap;
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!TILED_NODES.has(nodeData.name)) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const result = onDrawForeground?.apply(this, arguments);
      drawMap(this, ctx);
      return result;
    };
  },
});
