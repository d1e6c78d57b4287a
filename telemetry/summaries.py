"""The dashboard's summaries, written once, in SQL: each statement adds a batch's new events
(the `incoming` table that storage.py stages, rows with `stored_id IS NULL`) to one summary
table. Storage runs them in the batch's transaction; forgetting.py subtracts by the same keys.
"""

# A cell's identity within its notebook: its id, else '#<index>', else ''.
CELL_KEY = """CASE WHEN cell_id <> '' THEN cell_id
    WHEN cell_index IS NOT NULL THEN '#' || CAST(cell_index AS TEXT) ELSE '' END"""

# Summaries add up the new events, each in its document's course; a cell's latest run wins.
UPSERT_CELL_RUNS = f"""
INSERT INTO cell_runs (student_id, notebook_path, cell_key, course_id, cell_id, cell_index,
                       runs, errors, last_status, last_error, last_event_id)
SELECT runs.student_id, runs.notebook_path, runs.cell_key, COALESCE(i.course_id, i.shown_course),
       i.cell_id, i.cell_index, runs.runs, runs.errors, i.status, i.error_text, i.id
FROM (
    SELECT student_id, COALESCE(notebook_path, '') AS notebook_path, {CELL_KEY} AS cell_key,
           COUNT(*) AS runs, COUNT(*) FILTER (WHERE status = 'error') AS errors,
           MAX(position) AS latest
    FROM incoming WHERE stored_id IS NULL AND status IS NOT NULL GROUP BY 1, 2, 3
) runs JOIN incoming i ON i.position = runs.latest WHERE true
ON CONFLICT (student_id, notebook_path, cell_key) DO UPDATE SET
    course_id = COALESCE(excluded.course_id, cell_runs.course_id), cell_id = excluded.cell_id,
    cell_index = COALESCE(excluded.cell_index, cell_runs.cell_index),
    runs = cell_runs.runs + excluded.runs, errors = cell_runs.errors + excluded.errors,
    last_status = excluded.last_status, last_error = excluded.last_error,
    last_event_id = excluded.last_event_id"""

UPSERT_STUDENT_COUNTS = """
INSERT INTO student_counts (student_id, events, executions, errors)
SELECT student_id, COUNT(*), COUNT(status), COUNT(*) FILTER (WHERE status = 'error')
FROM incoming WHERE stored_id IS NULL GROUP BY student_id
ON CONFLICT (student_id) DO UPDATE SET events = student_counts.events + excluded.events,
    executions = student_counts.executions + excluded.executions,
    errors = student_counts.errors + excluded.errors"""

# A help event counts in activity if it raised a hand, which then bears its id.
UPSERT_ACTIVITY = """
INSERT INTO activity (course_id, minute, executions, errors, help)
SELECT course_id, minute, COUNT(status), COUNT(*) FILTER (WHERE status = 'error'), SUM(raised)
FROM (
    SELECT COALESCE(course_id, shown_course, '') AS course_id, minute, status,
           CASE WHEN EXISTS (SELECT 1 FROM hand_raises h WHERE h.raise_id = incoming.id)
                THEN 1 ELSE 0 END AS raised
    FROM incoming WHERE stored_id IS NULL
) new GROUP BY course_id, minute HAVING COUNT(status) > 0 OR SUM(raised) > 0
ON CONFLICT (course_id, minute) DO UPDATE SET
    executions = activity.executions + excluded.executions,
    errors = activity.errors + excluded.errors, help = activity.help + excluded.help"""

# A batch's new events in activity_teams, as UPSERT_ACTIVITY counts them in activity.
UPSERT_TEAM_ACTIVITY = """
INSERT INTO activity_teams (course_id, team, minute, executions, errors, help)
SELECT course_id, team, minute, COUNT(status), COUNT(*) FILTER (WHERE status = 'error'),
       SUM(raised)
FROM (
    SELECT COALESCE(course_id, shown_course, '') AS course_id, shown_team AS team, minute,
           status, CASE WHEN EXISTS (SELECT 1 FROM hand_raises h WHERE h.raise_id = incoming.id)
                THEN 1 ELSE 0 END AS raised
    FROM incoming WHERE stored_id IS NULL AND shown_team IS NOT NULL
) new GROUP BY course_id, team, minute HAVING COUNT(status) > 0 OR SUM(raised) > 0
ON CONFLICT (course_id, team, minute) DO UPDATE SET
    executions = activity_teams.executions + excluded.executions,
    errors = activity_teams.errors + excluded.errors, help = activity_teams.help + excluded.help"""

# Who sent anything in a minute: one row each, however many of their events it holds.
INSERT_ACTIVE_MINUTES = """
INSERT INTO active_minutes (course_id, minute, student_id)
SELECT DISTINCT COALESCE(course_id, shown_course, ''), minute, student_id
FROM incoming WHERE stored_id IS NULL
ON CONFLICT (course_id, minute, student_id) DO NOTHING"""


# In the order the batch script runs them.
SUMMARY_WRITES = (UPSERT_CELL_RUNS, UPSERT_STUDENT_COUNTS, UPSERT_ACTIVITY, UPSERT_TEAM_ACTIVITY,
                  INSERT_ACTIVE_MINUTES)  # fmt: skip
