// Drives the memctl server with the `openai` npm package the way Roo Code's "OpenAI Compatible"
// provider does: streamed chat with stream_options.include_usage, tools, tool_choice "auto",
// parallel_tool_calls and max_completion_tokens; then the tool result goes back in the history.
// Usage: node roo_stream.cjs BASE_URL MODEL   (prints one JSON object with what came back)
const OpenAI = require("openai");

const [baseURL, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "not-needed", maxRetries: 0, timeout: 60000 });
const tools = [{
  type: "function",
  function: {
    name: "read_file",
    description: "Request to read the contents of a file.",
    parameters: { type: "object", properties: { path: { type: "string" } }, required: ["path"] },
  },
}];

async function streamed(messages) {
  const stream = await client.chat.completions.create({
    model, messages, stream: true, stream_options: { include_usage: true },
    tools, tool_choice: "auto", parallel_tool_calls: true, max_completion_tokens: 64, temperature: 0,
  });
  const out = { text: "", calls: {}, finish: [], usage: null };
  for await (const chunk of stream) {
    if (chunk.usage) out.usage = chunk.usage;
    for (const choice of chunk.choices) {
      if (choice.delta?.content) out.text += choice.delta.content;
      for (const tc of choice.delta?.tool_calls ?? []) {
        const c = (out.calls[tc.index] ??= { id: "", name: "", arguments: "" });
        if (tc.id) c.id = tc.id;
        if (tc.function?.name) c.name += tc.function.name;
        if (tc.function?.arguments) c.arguments += tc.function.arguments;
      }
      if (choice.finish_reason) out.finish.push(choice.finish_reason);
    }
  }
  return out;
}

(async () => {
  const system = { role: "system", content: "You are Roo, a coding assistant." };
  const ask = { role: "user", content: 'call read_file {"path": "src/app.ts"}' };
  const first = await streamed([system, ask]);
  const call = first.calls[0];
  const second = await streamed([
    system, ask,
    { role: "assistant", content: "", tool_calls: [{ id: call.id, type: "function",
      function: { name: call.name, arguments: call.arguments } }] },
    { role: "tool", tool_call_id: call.id, content: "export const x = 1;" },
    { role: "user", content: "thanks" },
  ]);
  const models = [];
  for await (const m of client.models.list()) models.push(m.id);
  console.log(JSON.stringify({ first, second, models }));
})().catch((err) => {
  console.error(String(err?.stack || err));
  process.exit(1);
});
