package metrics_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/metrics"
)

// TestWorkflowMetrics: the steps of a failover or rollback are counted
// once, when it ends, by type, step, phase and status, from its record on
// the bus; a failed one is counted by whether it was compensated; events
// while it runs and the reconcile's repeat of its end count nothing.
func TestWorkflowMetrics(t *testing.T) {
	b := testenv.StartBus(t)
	e, err := metrics.New(metrics.Config{Conn: b.Conn(), JetStream: b.JetStream(), Counters: &counters{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close(context.Background()) })
	created := time.Now().UTC()
	done := created.Add(time.Minute)
	undo := 1
	step := func(name, status string, undoes *int) commands.WorkflowStep {
		return commands.WorkflowStep{Name: name, VolumeID: "v", Status: status, Undoes: undoes}
	}
	completed := []commands.WorkflowStep{step("snapshot", commands.StepDone, nil), step("detach", commands.StepDone, nil),
		step("attach", commands.StepDone, nil), step("start_vm", commands.StepDone, nil)}
	undone := []commands.WorkflowStep{step("detach", commands.StepDone, nil), step("attach", commands.StepUndone, nil),
		step("start_vm", commands.StepFailed, nil), step("detach", commands.StepDone, &undo)}
	for _, op := range []commands.Operation{
		// Running: not counted.
		{ID: "op-1", Type: commands.OpFailover, Status: commands.StatusExecuting, CreatedAt: created,
			Workflow: &commands.Workflow{Steps: completed[:2]}},
		// Completed: the response's steps (no workflow on this record).
		{ID: "op-1", Type: commands.OpFailover, Status: commands.StatusCompleted, CreatedAt: created, CompletedAt: &done,
			Response: &commands.OpResponse{Steps: completed}},
		{ID: "op-2", Type: commands.OpFailover, Status: commands.StatusFailed, CreatedAt: created, CompletedAt: &done,
			Workflow: &commands.Workflow{Steps: undone, Compensating: true}, Details: map[string]any{commands.DetailCompensated: true}},
		{ID: "op-3", Type: commands.OpRollback, Status: commands.StatusFailed, CreatedAt: created, CompletedAt: &done,
			Workflow: &commands.Workflow{Steps: []commands.WorkflowStep{step("stop_vm", commands.StepDone, nil), step("revert", commands.StepFailed, nil)}},
			Details:  map[string]any{commands.DetailCompensated: false}},
		// The reconcile's record of a step's timed-out job: counted already.
		{ID: "op-3", Type: commands.OpRollback, Status: commands.StatusFailed, CreatedAt: created, CompletedAt: &done,
			Workflow: &commands.Workflow{Steps: []commands.WorkflowStep{step("revert", commands.StepFailed, nil)}},
			Details:  map[string]any{commands.DetailCompensated: false, commands.DetailResolvedAt: done.Format(time.RFC3339)}},
		// The reconcile's record that what it left was put back: counted already.
		{ID: "op-3", Type: commands.OpRollback, Status: commands.StatusFailed, CreatedAt: created, CompletedAt: &done,
			Workflow: &commands.Workflow{Steps: []commands.WorkflowStep{step("revert", commands.StepFailed, nil)}},
			Details:  map[string]any{commands.DetailCompensated: false, commands.DetailSettledAt: done.Format(time.RFC3339)}},
		// Published last: once it is counted, everything before it is.
		{ID: "op-4", Type: commands.OpStartVM, Status: commands.StatusCompleted, ParentID: "op-1", CreatedAt: created, CompletedAt: &done},
	} {
		data, _ := json.Marshal(op)
		if err := b.Conn().Publish(commands.OpSubject(op.ID), data); err != nil {
			t.Fatal(err)
		}
	}
	reg := e.Registry()
	testenv.Eventually(t, 30*time.Second, func() bool {
		fams, err := reg.Gather()
		if err != nil {
			return false
		}
		for _, f := range fams {
			for _, m := range f.Metric {
				labels := map[string]string{}
				for _, l := range m.Label {
					labels[l.GetName()] = l.GetValue()
				}
				if f.GetName() == "volumed_operations_total" && labels["type"] == "start_vm" && labels["status"] == "completed" {
					return m.Counter.GetValue() == 1
				}
			}
		}
		return false
	}, "the last event counted")
	want := `
# HELP volumed_workflow_failures_total Failovers and rollbacks that failed, by type and whether what they did was undone (compensated true); compensated false left volumes or snapshots that need a person.
# TYPE volumed_workflow_failures_total counter
volumed_workflow_failures_total{compensated="false",type="failover"} 0
volumed_workflow_failures_total{compensated="false",type="rollback"} 1
volumed_workflow_failures_total{compensated="true",type="failover"} 1
volumed_workflow_failures_total{compensated="true",type="rollback"} 0
# HELP volumed_workflow_steps_total Steps of the failovers and rollbacks that ended, by workflow type, step (snapshot, detach, attach, export, start_vm, stop_vm, revert, delete_snapshot), phase (forward, or undo for a compensating step) and final status (done, failed, undone, skipped, pending).
# TYPE volumed_workflow_steps_total counter
volumed_workflow_steps_total{phase="forward",status="done",step="attach",type="failover"} 1
volumed_workflow_steps_total{phase="forward",status="done",step="detach",type="failover"} 2
volumed_workflow_steps_total{phase="forward",status="done",step="snapshot",type="failover"} 1
volumed_workflow_steps_total{phase="forward",status="done",step="start_vm",type="failover"} 1
volumed_workflow_steps_total{phase="forward",status="done",step="stop_vm",type="rollback"} 1
volumed_workflow_steps_total{phase="forward",status="failed",step="revert",type="rollback"} 1
volumed_workflow_steps_total{phase="forward",status="failed",step="start_vm",type="failover"} 1
volumed_workflow_steps_total{phase="forward",status="undone",step="attach",type="failover"} 1
volumed_workflow_steps_total{phase="undo",status="done",step="detach",type="failover"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "volumed_workflow_steps_total", "volumed_workflow_failures_total"); err != nil {
		t.Fatal(err)
	}
}
