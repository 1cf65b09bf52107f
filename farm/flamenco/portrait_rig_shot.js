// SPDX-License-Identifier: GPL-3.0-or-later
//
// Flamenco job type "Portrait Rig Shot": renders a shot file exported from Blender (File >
// Export > Portrait Rig Shot) with `portrait-rig render`, in frame chunks, on workers without
// Blender; then the contact sheet and a preview video. Every chunk renders on the studio's
// render server (the front end of the Ray cluster, docs/cluster.md). Install: copy into the
// `scripts` folder next to flamenco-manager and give the workers that have Portrait Rig
// installed the task type "portrait-rig".

const JOB_TYPE = {
    label: "Portrait Rig Shot",
    description: "Render an exported Portrait Rig shot file without Blender",
    settings: [
        { key: "shot_file", type: "string", subtype: "file_path", required: true,
          description: "The shot file (.json) written by Export Shot, on shared storage" },
        { key: "frames", type: "string", required: true,
          eval: "f'{C.scene.frame_start}-{C.scene.frame_end}'",
          description: "Frames of the shot to render, e.g. '1-240'" },
        { key: "chunk_size", type: "int32", default: 48, propargs: { min: 1 },
          visible: "submission", description: "Frames per task" },
        { key: "server", type: "string", required: true, visible: "submission",
          description: "HOST:PORT of the Portrait Rig render server (its token comes from " +
                       "PORTRAIT_RIG_TOKEN on the workers)" },
        { key: "output_dir", type: "string", subtype: "dir_path", required: true,
          visible: "submission", description: "Folder the frames, passes and video go to" },
        { key: "passes_as", type: "string", default: "exr", choices: ["exr", "png"],
          visible: "submission", description: "File format of the shot's passes" },
        { key: "fps", type: "float", eval: "C.scene.render.fps / C.scene.render.fps_base",
          visible: "hidden" },
        { key: "portrait_rig", type: "string", default: "portrait-rig", visible: "web",
          description: "The portrait-rig command on the workers" },
    ],
};

const TASK_TYPE = "portrait-rig";
const SERVER = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$/;

function compileJob(job) {
    const settings = job.settings;
    if (!SERVER.test(`${settings.server || ""}`.trim())) {
        throw `server: expected HOST:PORT of the Portrait Rig render server, got "${settings.server}"`;
    }
    if (["exr", "png"].indexOf(settings.passes_as) < 0) {
        throw `passes_as: expected exr or png, got "${settings.passes_as}"`;
    }
    const common = ["--out", settings.output_dir, "--server", settings.server.trim(),
                    "--passes-as", settings.passes_as];

    const renders = [];
    for (const chunk of frameChunker(settings.frames, settings.chunk_size)) {
        const task = author.Task(`render-${chunk}`, TASK_TYPE);
        task.addCommand(author.Command("exec", {
            exe: settings.portrait_rig,
            args: ["render", settings.shot_file, ...common, "--frames", chunk,
                   "--no-sheet", "--no-video"],
        }));
        job.addTask(task);
        renders.push(task);
    }

    // Renders whatever a failed chunk left out (frames already there are skipped), then
    // writes the contact sheet.
    const sheet = author.Task("contact-sheet", TASK_TYPE);
    sheet.addCommand(author.Command("exec", {
        exe: settings.portrait_rig,
        args: ["render", settings.shot_file, ...common, "--frames", settings.frames,
               "--no-video"],
    }));
    for (const task of renders) sheet.addDependency(task);
    job.addTask(sheet);

    if (settings.fps) {
        const video = author.Task("preview-video", "ffmpeg");
        video.addCommand(author.Command("frames-to-video", {
            exe: "ffmpeg",
            fps: settings.fps,
            inputGlob: path.join(settings.output_dir, "frame_*.png"),
            outputFile: path.join(settings.output_dir,
                                  `${path.stem(settings.shot_file)}.mp4`),
            args: ["-c:v", "h264", "-crf", "18", "-pix_fmt", "yuv420p",
                   "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-y"],
        }));
        video.addDependency(sheet);
        job.addTask(video);
    }
}
