{#
  not_blank: fails on every row whose text is null, empty or only whitespace.
#}
{% test not_blank(model, column_name) %}
select *
from {{ model }}
where {{ column_name }} is null or trim({{ column_name }}) = ''
{% endtest %}
