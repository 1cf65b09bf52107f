// SPDX-License-Identifier: GPL-3.0-or-later
//
// A stand-in for Flamenco Manager's job-compiler environment, for testing job types with
// Node's test runner: the globals Flamenco gives a compiler script (author, path,
// frameChunker, frameCount, formatTimestampLocal, print, alert), a job object, and the
// manager's handling of settings (defaults filled in, required ones checked). Frame ranges
// follow the manager's rules: "A-B" or "A..B" parts joined by commas, duplicates removed,
// chunks of at most chunk_size frames written as "A-B", "A,B" or "A".

"use strict";

const fs = require("node:fs");
const nodePath = require("node:path");
const vm = require("node:vm");

function explodeFrames(range) {
    const frames = new Set();
    for (const part of `${range}`.replaceAll("..", "-").split(",")) {
        const ends = part.split("-").map((s) => s.trim());
        const numbers = ends.map(Number);
        if (ends.length > 2 || ends.some((s) => !/^-?\d+$/.test(s))) {
            throw new Error(`invalid range "${range}": ${part}`);
        }
        const [lo, hi] = numbers.length === 1 ? [numbers[0], numbers[0]] : numbers;
        for (let f = lo; f <= hi; f++) frames.add(f);
    }
    return [...frames].sort((a, b) => a - b);
}

function mergeFrames(frames) {
    const parts = [];
    let start = frames[0];
    for (let i = 1; i <= frames.length; i++) {
        if (i < frames.length && frames[i] === frames[i - 1] + 1) continue;
        const end = frames[i - 1];
        if (end === start) parts.push(`${start}`);
        else if (end === start + 1) parts.push(`${start}`, `${end}`);
        else parts.push(`${start}-${end}`);
        if (i < frames.length) start = frames[i];
    }
    return parts.join(",");
}

function frameChunker(range, chunkSize) {
    if (!`${range}`.trim()) throw new Error(`invalid range "${range}": empty range`);
    if (!(chunkSize >= 1)) throw new Error(`invalid chunk size, must be positive: ${chunkSize}`);
    const frames = explodeFrames(range);
    const chunks = [];
    for (let i = 0; i < frames.length; i += chunkSize) {
        chunks.push(mergeFrames(frames.slice(i, i + chunkSize)));
    }
    return chunks;
}

function formatTimestampLocal(date) {
    const two = (n) => `${n}`.padStart(2, "0");
    return `${date.getFullYear()}-${two(date.getMonth() + 1)}-${two(date.getDate())}_` +
           `${two(date.getHours())}${two(date.getMinutes())}${two(date.getSeconds())}`;
}

const author = {
    Task(name, type) {
        if (!`${name}`.trim()) throw new Error("author.Task(name, type): name is required");
        if (!`${type}`.trim()) throw new Error("author.Task(name, type): type is required");
        return {
            name: name.trim(), type: type.trim(), commands: [], dependencies: [],
            addCommand(command) { this.commands.push(command); },
            addDependency(task) { this.dependencies.push(task); },
        };
    },
    // Parameters reach the workers as JSON: keep what survives that (and plain arrays of
    // this realm, so tests compare them structurally).
    Command(name, parameters) {
        return { name, parameters: JSON.parse(JSON.stringify(parameters)) };
    },
};

const path = {
    join: (...parts) => nodePath.posix.join(...parts),
    dirname: (p) => nodePath.posix.dirname(p),
    basename: (p) => nodePath.posix.basename(p),
    stem: (p) => nodePath.posix.parse(p).name,
};

// Load a job compiler script as the manager does (a plain script, not a module).
function loadJobType(file) {
    const printed = [];
    const context = vm.createContext({
        author, path, frameChunker, formatTimestampLocal,
        frameCount: (range) => explodeFrames(range).length,
        print: (...args) => printed.push(args.join(" ")),
        alert: (...args) => printed.push(args.join(" ")),
    });
    vm.runInContext(fs.readFileSync(file, "utf8"), context, { filename: file });
    const jobType = vm.runInContext("JOB_TYPE", context);
    const compileJob = vm.runInContext("compileJob", context);

    // Submit a job: defaults filled in, required settings checked, then compiled.
    function submit(settings, { name = "job", created = new Date(2026, 0, 2, 3, 4, 5) } = {}) {
        const filled = {};
        for (const setting of jobType.settings) {
            if (setting.key in settings) filled[setting.key] = settings[setting.key];
            else if ("default" in setting) filled[setting.key] = setting.default;
            else if (setting.required) throw new Error(`setting ${setting.key} is required`);
        }
        const job = {
            name, created, settings: filled, tasks: [],
            addTask(task) { this.tasks.push(task); },
        };
        compileJob(job);
        return job;
    }
    return { jobType, submit, printed };
}

module.exports = { frameChunker, formatTimestampLocal, loadJobType };
