// Answers visual questions with transformers.js from an exported bundle, as a Node app would.
//
//   node answer.mjs BUNDLE_DIR QUESTIONS.json MAX_NEW_TOKENS > answers.json
//
// QUESTIONS.json: [{"image": "/abs/path.png", "question": "..."}]. The bundle is loaded with
// the stock LlavaForConditionalGeneration / AutoProcessor, no option beyond a local path: dtype,
// external data and the image-token count come from the bundle's own files. The prompt comes
// from the bundle's chat template. Prints {"answers": [...], "image_tokens": N, "seconds": S}.
import { readFileSync } from "node:fs";
import path from "node:path";
import { AutoProcessor, LlavaForConditionalGeneration, RawImage, env } from "@huggingface/transformers";

const [bundle, questionsFile, maxNew] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(bundle));
const name = path.basename(path.resolve(bundle));

const start = Date.now();
const processor = await AutoProcessor.from_pretrained(name);
const model = await LlavaForConditionalGeneration.from_pretrained(name, { device: "cpu" });
const imageTokenId = model.config.image_token_index ?? model.config.image_token_id;
const answers = [];
let imageTokens = -1;
for (const { image, question } of JSON.parse(readFileSync(questionsFile, "utf8"))) {
  const messages = [{ role: "user", content: [{ type: "image" }, { type: "text", text: question }] }];
  const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
  const inputs = await processor(await RawImage.read(image), prompt);
  imageTokens = inputs.input_ids.tolist()[0].filter((t) => Number(t) === imageTokenId).length;
  const output = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
  const prompt_length = inputs.input_ids.dims.at(-1);
  const generated = output.slice(null, [prompt_length, null]);
  answers.push(processor.batch_decode(generated, { skip_special_tokens: true })[0]);
}
await model.dispose();
console.log(JSON.stringify({ answers, image_tokens: imageTokens, seconds: (Date.now() - start) / 1000 }));
