// SPDX-License-Identifier: GPL-3.0-or-later
//
// Flamenco job type "Portrait Rig Render": renders a .blend whose render engine is Portrait
// Rig in frame chunks, one Blender per chunk, every Blender pointed at the studio's render
// server (the front end of the Ray cluster, docs/cluster.md), then encodes a preview video.
// Install: copy into the `scripts` folder next to flamenco-manager; workers that run
// `blender` tasks need Blender with the Portrait Rig extension enabled.

const JOB_TYPE = {
    label: "Portrait Rig Render",
    description: "Render a Portrait Rig scene in frame chunks on the studio's render server",
    settings: [
        { key: "frames", type: "string", required: true,
          eval: "f'{C.scene.frame_start}-{C.scene.frame_end}'",
          evalInfo: { showLinkButton: true, description: "Scene frame range" },
          description: "Frames to render, e.g. '1-240' or '1-10, 20-30'" },
        { key: "chunk_size", type: "int32", default: 24, propargs: { min: 1 },
          visible: "submission",
          description: "Frames per Blender task; each task keeps up to 16 frames queued on " +
                       "the server, so chunks of a few dozen frames keep the GPUs busy" },
        { key: "server", type: "string", required: true, visible: "submission",
          description: "HOST:PORT of the Portrait Rig render server the workers' Blender " +
                       "renders on (its token comes from PORTRAIT_RIG_TOKEN on the workers)" },

        { key: "render_output_root", type: "string", subtype: "dir_path", required: true,
          visible: "submission", description: "Folder the job's frames go under" },
        { key: "add_path_components", type: "int32", required: true, default: 0,
          propargs: { min: 0, max: 32 }, visible: "submission",
          description: "Number of folders of the blend file's path repeated in the output path" },
        { key: "render_output_path", type: "string", subtype: "file_path", editable: false,
          eval: "str(Path(abspath(settings.render_output_root), " +
                "last_n_dir_parts(settings.add_path_components), jobname, '{timestamp}', '######'))",
          description: "Where the frames are written" },

        { key: "blendfile", type: "string", required: true, visible: "web",
          description: "The blend file to render" },
        { key: "render_engine", type: "string", required: true, visible: "hidden",
          eval: "C.scene.render.engine" },
        { key: "fps", type: "float", eval: "C.scene.render.fps / C.scene.render.fps_base",
          visible: "hidden" },
        { key: "format", type: "string", required: true, visible: "web",
          eval: "C.scene.render.image_settings.file_format" },
        { key: "image_file_extension", type: "string", required: true, visible: "hidden",
          eval: "C.scene.render.file_extension" },
    ],
};

const ENGINE = "PORTRAIT_RIG";
const SERVER = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/;
const MOVIE_FORMATS = new Set(["FFMPEG", "AVI_RAW", "AVI_JPEG"]);
const NO_FFMPEG_INPUT = new Set(["EXR", "MULTILAYER", "OPEN_EXR", "OPEN_EXR_MULTILAYER"]);

function compileJob(job) {
    const settings = job.settings;
    if (settings.render_engine !== ENGINE) {
        throw `the scene renders with ${settings.render_engine}, not Portrait Rig: set ` +
              "Render Properties > Render Engine to Portrait Rig";
    }
    if (MOVIE_FORMATS.has(settings.format)) {
        throw `Portrait Rig Render writes image sequences, not ${settings.format} movies`;
    }
    const server = parseServer(settings.server);
    const output = settings.render_output_path =
        fillTimestamp(settings.render_output_path, job.created);
    const renderDir = path.dirname(output);

    const renders = [];
    for (const chunk of frameChunker(settings.frames, settings.chunk_size)) {
        const task = author.Task(`render-${chunk}`, "blender");
        task.addCommand(author.Command("blender-render", {
            exe: "{blender}",
            exeArgs: "{blenderArgs}",
            argsBefore: [],
            blendfile: settings.blendfile,
            args: [
                // After the file is loaded and before rendering: point the extension at the
                // server; a missing extension stops Blender with status 1.
                "--python-exit-code", "1",
                "--python-expr", serverExpression(server),
                "--render-output", output,
                "--render-format", settings.format,
                "--render-frame", chunk.replaceAll("-", ".."),
            ],
        }));
        job.addTask(task);
        renders.push(task);
    }

    const video = videoTask(settings, renderDir);
    if (video) {
        for (const task of renders) video.addDependency(task);
        job.addTask(video);
    }
}

// "host:port" -> {host, port}; throws a message the artist can act on.
function parseServer(text) {
    const match = SERVER.exec(`${text || ""}`.trim());
    if (!match || Number(match[2]) < 1 || Number(match[2]) > 65535) {
        throw `server: expected HOST:PORT of the Portrait Rig render server, got "${text}"`;
    }
    return { host: match[1].replace(/^\[|\]$/g, ""), port: Number(match[2]) };
}

// Python run by Blender after loading the file: the extension's preferences take the server
// address, and the token from the worker's environment (never part of the job).
function serverExpression(server) {
    return [
        "import os, bpy",
        "prefs = [a.preferences for n, a in bpy.context.preferences.addons.items() " +
            "if n.rpartition('.')[2] == 'portrait_rig']",
        "if not prefs: raise RuntimeError('the Portrait Rig extension is not enabled in " +
            "this Blender')",
        `prefs[0].server_host = ${JSON.stringify(server.host)}`,
        `prefs[0].server_port = ${server.port}`,
        "prefs[0].token = os.environ.get('PORTRAIT_RIG_TOKEN', '')",
    ].join("\n");
}

function fillTimestamp(text, created) {
    if (!text) throw "render_output_path: not set";
    return text.replace(/{timestamp}/g, () => formatTimestampLocal(created));
}

function videoTask(settings, renderDir) {
    if (NO_FFMPEG_INPUT.has(settings.format) || !settings.fps) {
        print("Portrait Rig Render: no preview video for", settings.format, "frames");
        return null;
    }
    const stem = path.stem(settings.blendfile).replace(".flamenco", "");
    const task = author.Task("preview-video", "ffmpeg");
    task.addCommand(author.Command("frames-to-video", {
        exe: "ffmpeg",
        fps: settings.fps,
        inputGlob: path.join(renderDir, `*${settings.image_file_extension}`),
        outputFile: path.join(renderDir, `${stem}.mp4`),
        args: ["-c:v", "h264", "-crf", "18", "-pix_fmt", "yuv420p",
               "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-y"],
    }));
    return task;
}
