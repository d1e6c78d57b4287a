// 日本語: every key of en.js, in Japanese (see i18n.js).
export const ja = {
  "app.title": "授業テレメトリ",
};
