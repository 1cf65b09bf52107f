// SPDX-License-Identifier: GPL-3.0-or-later
"use strict";

const assert = require("node:assert/strict");
const path = require("node:path");
const { test } = require("node:test");

const { loadJobType } = require("./flamenco_api.js");

const SCRIPT = path.join(__dirname, "..", "portrait_rig_shot.js");

const SETTINGS = {
    shot_file: "/projects/sc01/take3.json",
    frames: "1-100",
    server: "10.0.0.5:7865",
    output_dir: "/render/sc01/take3",
    fps: 25,
};

function argAfter(args, flag) {
    return args[args.indexOf(flag) + 1];
}

test("portrait-rig render per chunk, the contact sheet after them, then the video", () => {
    const { jobType, submit } = loadJobType(SCRIPT);
    assert.equal(jobType.label, "Portrait Rig Shot");
    const job = submit(SETTINGS);
    assert.deepEqual(job.tasks.map((t) => t.name),
                     ["render-1-48", "render-49-96", "render-97-100", "contact-sheet",
                      "preview-video"]);
    const renders = job.tasks.slice(0, 3);
    for (const task of renders) {
        assert.equal(task.type, "portrait-rig");
        const { name, parameters } = task.commands[0];
        assert.equal(name, "exec");
        assert.equal(parameters.exe, "portrait-rig");
        const args = parameters.args;
        assert.deepEqual(args.slice(0, 2), ["render", SETTINGS.shot_file]);
        assert.equal(argAfter(args, "--out"), SETTINGS.output_dir);
        assert.equal(argAfter(args, "--server"), SETTINGS.server);
        assert.equal(argAfter(args, "--passes-as"), "exr");
        assert.ok(args.includes("--no-sheet") && args.includes("--no-video"));
    }
    assert.deepEqual(renders.map((t) => argAfter(t.commands[0].parameters.args, "--frames")),
                     ["1-48", "49-96", "97-100"]);

    const [sheet, video] = job.tasks.slice(3);
    assert.deepEqual(sheet.dependencies, renders);
    const sheetArgs = sheet.commands[0].parameters.args;
    assert.equal(argAfter(sheetArgs, "--frames"), "1-100");
    assert.ok(!sheetArgs.includes("--no-sheet"));
    assert.deepEqual(video.dependencies, [sheet]);
    assert.equal(video.commands[0].name, "frames-to-video");
    assert.equal(video.commands[0].parameters.inputGlob, "/render/sc01/take3/frame_*.png");
    assert.equal(video.commands[0].parameters.outputFile, "/render/sc01/take3/take3.mp4");
});

test("settings: chunk size, pass format and the command are honoured", () => {
    const { submit } = loadJobType(SCRIPT);
    const job = submit({ ...SETTINGS, frames: "1-10", chunk_size: 5, passes_as: "png",
                         portrait_rig: "/opt/portrait-rig/bin/portrait-rig" });
    assert.deepEqual(job.tasks.map((t) => t.name),
                     ["render-1-5", "render-6-10", "contact-sheet", "preview-video"]);
    const { parameters } = job.tasks[0].commands[0];
    assert.equal(parameters.exe, "/opt/portrait-rig/bin/portrait-rig");
    assert.equal(argAfter(parameters.args, "--passes-as"), "png");
});

test("no fps: no video; bad settings are refused", () => {
    const { submit } = loadJobType(SCRIPT);
    const settings = { ...SETTINGS };
    delete settings.fps;
    assert.equal(submit(settings).tasks.at(-1).name, "contact-sheet");
    assert.throws(() => submit({ ...SETTINGS, server: "nowhere" }), /HOST:PORT/);
    assert.throws(() => submit({ ...SETTINGS, passes_as: "tiff" }), /exr or png/);
    assert.throws(() => submit({ ...SETTINGS, frames: "" }), /empty range/);
});
