// SPDX-License-Identifier: GPL-3.0-or-later
"use strict";

const assert = require("node:assert/strict");
const path = require("node:path");
const { test } = require("node:test");

const { frameChunker, loadJobType } = require("./flamenco_api.js");

const SCRIPT = path.join(__dirname, "..", "portrait_rig_render.js");

const SETTINGS = {
    frames: "1-50",
    chunk_size: 20,
    server: "render-head.studio:7865",
    render_output_root: "/render",
    render_output_path: "/render/shots/job/{timestamp}/######",
    blendfile: "/projects/shots/sc01.flamenco.blend",
    render_engine: "PORTRAIT_RIG",
    fps: 24,
    format: "PNG",
    image_file_extension: ".png",
};

function argAfter(args, flag) {
    return args[args.indexOf(flag) + 1];
}

test("frame chunks follow the manager's notation", () => {
    assert.deepEqual(frameChunker("1-10", 4), ["1-4", "5-8", "9,10"]);
    assert.deepEqual(frameChunker("1..3, 7, 9-10", 2), ["1,2", "3,7", "9,10"]);
    assert.deepEqual(frameChunker("5", 3), ["5"]);
    assert.deepEqual(frameChunker("1-3,2-4", 10), ["1-4"]);
    assert.throws(() => frameChunker("", 3), /empty range/);
    assert.throws(() => frameChunker("1-x", 3), /invalid range/);
});

test("one Blender task per chunk, pointed at the server, then the video", () => {
    const { jobType, submit } = loadJobType(SCRIPT);
    assert.equal(jobType.label, "Portrait Rig Render");
    const job = submit(SETTINGS);
    const names = job.tasks.map((t) => t.name);
    assert.deepEqual(names, ["render-1-20", "render-21-40", "render-41-50", "preview-video"]);

    const renders = job.tasks.slice(0, 3);
    for (const task of renders) {
        assert.equal(task.type, "blender");
        assert.equal(task.commands.length, 1);
        const { name, parameters } = task.commands[0];
        assert.equal(name, "blender-render");
        assert.equal(parameters.exe, "{blender}");
        assert.equal(parameters.blendfile, SETTINGS.blendfile);
        const args = parameters.args;
        // The expression runs after the file is loaded and before the frames render.
        assert.ok(args.indexOf("--python-exit-code") < args.indexOf("--python-expr"));
        assert.ok(args.indexOf("--python-expr") < args.indexOf("--render-frame"));
        const expression = argAfter(args, "--python-expr");
        assert.match(expression, /server_host = "render-head\.studio"/);
        assert.match(expression, /server_port = 7865\b/);
        assert.match(expression, /PORTRAIT_RIG_TOKEN/);
        assert.equal(argAfter(args, "--render-format"), "PNG");
        assert.equal(argAfter(args, "--render-output"),
                     "/render/shots/job/2026-01-02_030405/######");
    }
    assert.deepEqual(renders.map((t) => argAfter(t.commands[0].parameters.args, "--render-frame")),
                     ["1..20", "21..40", "41..50"]);

    const video = job.tasks[3];
    assert.equal(video.type, "ffmpeg");
    assert.deepEqual(video.dependencies, renders);
    const { name, parameters } = video.commands[0];
    assert.equal(name, "frames-to-video");
    assert.equal(parameters.inputGlob, "/render/shots/job/2026-01-02_030405/*.png");
    assert.equal(parameters.outputFile, "/render/shots/job/2026-01-02_030405/sc01.mp4");
    assert.equal(parameters.fps, 24);
    // The job shows the output path it used.
    assert.equal(job.settings.render_output_path, "/render/shots/job/2026-01-02_030405/######");
});

test("defaults and uneven frame lists", () => {
    const { submit } = loadJobType(SCRIPT);
    const settings = { ...SETTINGS, frames: "1-30, 40, 45-47" };
    delete settings.chunk_size;                       // default: 24 frames a task
    const job = submit(settings);
    assert.deepEqual(job.tasks.map((t) => t.name),
                     ["render-1-24", "render-25-30,40,45-47", "preview-video"]);
    assert.equal(argAfter(job.tasks[1].commands[0].parameters.args, "--render-frame"),
                 "25..30,40,45..47");
});

test("IPv6 servers are written without brackets", () => {
    const { submit } = loadJobType(SCRIPT);
    const job = submit({ ...SETTINGS, server: "[::1]:7000" });
    const expression = argAfter(job.tasks[0].commands[0].parameters.args, "--python-expr");
    assert.match(expression, /server_host = "::1"/);
});

test("EXR frames get no video", () => {
    const { submit, printed } = loadJobType(SCRIPT);
    const job = submit({ ...SETTINGS, format: "OPEN_EXR", image_file_extension: ".exr" });
    assert.ok(job.tasks.every((t) => t.type === "blender"));
    assert.match(printed.join("\n"), /no preview video/);
});

test("wrong engine, movies, bad servers and missing settings are refused", () => {
    const { submit } = loadJobType(SCRIPT);
    assert.throws(() => submit({ ...SETTINGS, render_engine: "CYCLES" }), /not Portrait Rig/);
    assert.throws(() => submit({ ...SETTINGS, format: "FFMPEG" }), /image sequences/);
    for (const server of ["render-head", "host:99999", "a b:1", ""]) {
        assert.throws(() => submit({ ...SETTINGS, server }), /HOST:PORT/);
    }
    const settings = { ...SETTINGS };
    delete settings.server;
    assert.throws(() => submit(settings), /server is required/);
});
