// ModelInfer from Node.js against an infermesh gateway or worker (or Triton: same protocol).
//
//   npm ci
//   node infer.js 127.0.0.1:8001           # mlp: one [1,784] FP32 row, prints its 10 outputs
//   node infer.js 127.0.0.1:8001 digits    # digits: models/digits/example.json, prints the label
//
// The .proto files are loaded at run time with proto-loader, so no protoc is needed. The
// include root is proto/ (grpc_service.proto imports "inference/model_config.proto").
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const ROOT = path.resolve(__dirname, "..", "..");
const PROTO_ROOT = path.join(ROOT, "proto");

// Each model's input: name, datatype, shape and values.
const MODELS = {
  // The benchmark MLP (784 → 10); any row of 784 floats will do.
  mlp: () => ({ name: "input", datatype: "FP32", shape: [1, 784], values: Array.from({ length: 784 }, (_, i) => i / 784) }),
  // The digits classifier; example.json is one 8×8 image as a [1,64] row.
  digits: () => {
    const rows = JSON.parse(fs.readFileSync(path.join(ROOT, "models", "digits", "example.json"), "utf8"));
    return { name: "input", datatype: "FP32", shape: [1, 64], values: rows.flat() };
  },
};

// Raw tensor contents are little-endian and row-major: how a Triton client sends them, and
// how infermesh always answers.
function encodeFp32(values) {
  const buf = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => buf.writeFloatLE(v, i * 4));
  return buf;
}

function decode(datatype, buf) {
  const read = {
    FP32: [4, (o) => buf.readFloatLE(o)],
    FP64: [8, (o) => buf.readDoubleLE(o)],
    INT32: [4, (o) => buf.readInt32LE(o)],
    INT64: [8, (o) => buf.readBigInt64LE(o)],
  }[datatype];
  if (!read) throw new Error(`this example does not decode ${datatype}`);
  const [size, at] = read;
  return Array.from({ length: buf.length / size }, (_, i) => at(i * size));
}

function main() {
  const [address, model = "mlp"] = process.argv.slice(2);
  if (!address || !MODELS[model]) {
    console.error(`usage: node infer.js HOST:PORT [${Object.keys(MODELS).join("|")}]`);
    process.exit(2);
  }

  const definition = protoLoader.loadSync("inference/grpc_service.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto: model_name, raw_input_contents
    longs: String, // int64 shapes arrive as strings rather than losing precision
    enums: String,
    defaults: true,
  });
  const { inference } = grpc.loadPackageDefinition(definition);
  const client = new inference.GRPCInferenceService(address, grpc.credentials.createInsecure());

  const input = MODELS[model]();
  const request = {
    model_name: model,
    inputs: [{ name: input.name, datatype: input.datatype, shape: input.shape }],
    raw_input_contents: [encodeFp32(input.values)],
  };
  client.ModelInfer(request, { deadline: Date.now() + 10_000 }, (err, response) => {
    client.close();
    if (err) {
      console.error(`ModelInfer failed: ${grpc.status[err.code]}: ${err.details}`);
      process.exit(1);
    }
    response.outputs.forEach((out, i) => {
      const values = decode(out.datatype, response.raw_output_contents[i]);
      const shown = values.map((v) => (typeof v === "number" ? v.toFixed(6) : String(v)));
      console.log(`${out.name} ${out.datatype} [${out.shape.join(",")}]: ${shown.join(" ")}`);
      if (model === "mlp") {
        console.log(`argmax: ${values.indexOf(Math.max(...values))}`);
      }
    });
  });
}

main();
