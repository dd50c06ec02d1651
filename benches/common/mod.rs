//! Realistic bus envelopes, shared by the benchmarks.

use serde_json::{Value, json};

/// A status update of one execution, as a worker publishes it.
fn small_envelope() -> Vec<u8> {
    let env = json!({
        "event": "execution-updated",
        "data": {
            "executionId": "exe_01HZX7Q2M4N6P8R0T2V4X6Z8B0",
            "workflowId": "wf_01HZX6K3J5L7N9Q1S3U5W7Y9A1",
            "status": "running",
            "progress": 42,
            "updatedAt": "2024-06-10T14:21:07.512Z",
        },
        "ts": 1_718_029_267_512u64,
    });
    serde_json::to_vec(&env).unwrap()
}

/// A full execution state: the same fields plus each step's status, timings and output.
fn large_envelope() -> Vec<u8> {
    let steps: Vec<Value> = (0..15)
        .map(|i| {
            json!({
                "stepId": format!("step_{i:02}_01HZX7Q2M4N6P8R0T2"),
                "name": format!("Transform records batch {i}"),
                "status": if i < 12 { "succeeded" } else { "pending" },
                "startedAt": "2024-06-10T14:20:55.101Z",
                "finishedAt": "2024-06-10T14:21:01.877Z",
                "durationMs": 6776 + i,
                "output": {"rows": 1000 + i, "warnings": 0, "preview": "id,name,amount"},
            })
        })
        .collect();
    let env = json!({
        "event": "execution-updated",
        "data": {
            "executionId": "exe_01HZX7Q2M4N6P8R0T2V4X6Z8B0",
            "workflowId": "wf_01HZX6K3J5L7N9Q1S3U5W7Y9A1",
            "status": "running",
            "progress": 70,
            "updatedAt": "2024-06-10T14:21:07.512Z",
            "steps": steps,
        },
        "ts": 1_718_029_267_512u64,
    });
    serde_json::to_vec(&env).unwrap()
}

/// Both envelopes with their labels, checked to be the sizes their labels say.
pub fn envelopes() -> [(&'static str, Vec<u8>); 2] {
    let envs = [("200B", small_envelope()), ("4KiB", large_envelope())];
    for ((name, env), range) in envs.iter().zip([150..260, 3800..4400]) {
        assert!(range.contains(&env.len()), "{name}: {} bytes", env.len());
    }
    envs
}
