// Atelier's frontend extension. It gives Atelier's nodes their own colours, so that a user sees at a glance which
// nodes come from this pack, and it keeps the editor from falling back on a graph this server cannot run. It uses
// only the public app.registerExtension surface.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ATELIER_COLOR = "#2f4a5c";
const ATELIER_BGCOLOR = "#1d2f3b";
const FALLBACK_GRAPH_ROUTE = "/atelier/default_graph"; // the standalone server's; ComfyUI has no such route
const BLANK_GRAPH = { last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, extra: {},
                      version: 0.4 };

let fallbackGraph = null; // a promise of the server's fallback graph, fetched on first need

function nodeSignature(graph) {
  return graph.nodes.map((node) => `${node.id}:${node.type}`).sort().join(",");
}

// The frontend's own default graph (a fresh clone is what it loads when it has no graph of the user's to show),
// or a draft of it that a browser kept from an earlier visit: the same nodes, maybe moved or edited.
function isBuiltInDefault(graphData) {
  const builtIn = window.comfyAPI?.defaultGraph?.defaultGraph;
  return Boolean(builtIn && Array.isArray(graphData?.nodes) && nodeSignature(graphData) === nodeSignature(builtIn));
}

function lacksNodeTypes(graphData) {
  return graphData.nodes.some((node) => !(node.type in LiteGraph.registered_node_types));
}

// The server's fallback graph, or null: outside the standalone server, or when it names none.
async function fetchFallbackGraph() {
  try {
    const response = await api.fetchApi(FALLBACK_GRAPH_ROUTE);
    return response.ok ? await response.json() : null;
  } catch (error) {
    console.warn("Atelier: no fallback graph from the server", error);
    return null;
  }
}

app.registerExtension({
  name: "atelier.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.category?.startsWith("atelier")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.color ??= ATELIER_COLOR;
      this.bgcolor ??= ATELIER_BGCOLOR;
      return result;
    };
  },
  // A new browser of a returning user, "Load Default Workflow" or a stale draft would show the frontend's
  // default graph, whose nodes (UNETLoader, ModelSamplingAuraFlow, ...) the standalone server lacks: every node
  // red before the user did anything. The graph is swapped, in place and before it is configured, for the server's
  // fallback (its example workflow), or for a blank graph if even that cannot run here. Inside ComfyUI the
  // default graph's nodes exist, and it is left alone.
  async beforeConfigureGraph(graphData) {
    if (!isBuiltInDefault(graphData) || !lacksNodeTypes(graphData)) return;
    fallbackGraph ??= fetchFallbackGraph();
    const fetched = await fallbackGraph;
    const replacement = fetched && !lacksNodeTypes(fetched) ? fetched : BLANK_GRAPH;
    for (const key of Object.keys(graphData)) delete graphData[key];
    Object.assign(graphData, structuredClone(replacement));
  },
});
