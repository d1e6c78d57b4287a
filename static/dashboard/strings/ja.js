// 日本語: every key of en.js, in Japanese (see i18n.js).
export const ja = {
  "app.title": "授業テレメトリ",
  // 停滞の状態と、今日の対応の数字
  "status.stalled": "‖ 停滞",
  "status.stalled_title": "{since}から：最後の実行がエラーで、そのセルで{minutes}分以上成功なし、またはその後操作なし",
  "summary.stalled": "人が停滞",
  "queue.median": "今日の対応 {count}件・待ち時間の中央値 {wait}",
  "queue.median_none": "今日はまだ対応した挙手がありません",
};
